"""--capture-video: the GIFs a run writes, and recording a saved policy."""

from conftest import read_metrics, read_summary, run_dirs
from PIL import Image

TINY = ["--num-envs", "4", "--num-steps", "16", "--total-timesteps", "128", "--eval-episodes", "1"]


def gif_frames(path):
    """Frames shown by a GIF, counted from its durations: Pillow merges identical consecutive frames."""
    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
            assert im.convert("RGB").getbbox() is not None  # decodes, and is not blank
    return sum(durations) // 100  # 100 ms a frame


def test_capture_video_then_record_a_saved_policy(run_script, tmp_path):
    flags = ["--env-id", "con-5x5x3a", *TINY, "--eval-every", "1", "--capture-video", "--save-model"]
    out = run_script("mappo.py", *flags)
    assert out.returncode == 0, out.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert sorted(p.name for p in (run_dir / "videos").iterdir()) == ["iter_1.gif", "iter_2.gif"]
    # one evaluation episode, the start state and one frame per step: (episode length + 1) frames
    length_1 = float(read_metrics(run_dir)[0]["eval/episodic_length"])
    assert gif_frames(run_dir / "videos" / "iter_1.gif") == length_1 + 1
    length_2 = read_summary(run_dir)["eval/episodic_length"][0]
    assert gif_frames(run_dir / "videos" / "iter_2.gif") == length_2 + 1

    out = run_script("mappo.py", "--load-model", run_dir, "--eval-episodes", "1", "--capture-video")
    assert out.returncode == 0, out.stderr
    (loaded_dir,) = [d for d in run_dirs(tmp_path) if d != run_dir]
    length = read_summary(loaded_dir)["eval/episodic_length"][0]
    assert gif_frames(loaded_dir / "videos" / "iter_0.gif") == length + 1
