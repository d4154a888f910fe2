"""`diff mat_ppo.py mam_ppo.py` shows the network and nothing else: every top-level definition outside the
network section is identical to the character, and so are the Args fields outside its network block."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETWORK, PPO = "\n# Network\n", "\n# PPO\n"


def definitions(path):
    """-> (skeleton: [(name, source)] in file order, network names, Args source without its network fields,
    import lines)."""
    source = path.read_text()
    assert source.count(NETWORK) == 1 and source.count(PPO) == 1, f"{path.name}: section banners missing"
    net_start = source[: source.index(NETWORK)].count("\n") + 1
    net_end = source[: source.index(PPO)].count("\n") + 1
    skeleton, network, imports = [], [], []
    for node in ast.parse(source).body:
        text = ast.get_source_segment(source, node)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(text)
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the module docstring
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign):
            name = ",".join(ast.unparse(t) for t in node.targets)
        elif isinstance(node, ast.AnnAssign):
            name = ast.unparse(node.target)
        else:
            name = ast.unparse(node)[:40]
        (network if net_start <= node.lineno <= net_end else skeleton).append((name, text))
    skeleton = dict(skeleton)
    args = skeleton.pop("Args")
    args_common, _, args_network = args.partition("    # Network\n")
    return skeleton, [n for n, _ in network], args_common, imports, args_network


def test_mat_and_mam_differ_only_in_the_network():
    mat_skel, mat_net, mat_args, mat_imports, _ = definitions(ROOT / "mat_ppo.py")
    mam_skel, mam_net, mam_args, mam_imports, mam_args_net = definitions(ROOT / "mam_ppo.py")
    assert mat_net and mam_net, "empty network sections"
    assert "build_network" in mat_net and "build_network" in mam_net
    assert list(mat_skel) == list(mam_skel), "the skeletons define different names (or in another order)"
    for name in mat_skel:
        assert mat_skel[name] == mam_skel[name], f"{name} differs between mat_ppo.py and mam_ppo.py"
    assert mat_args == mam_args, "Args differ outside their network fields"
    assert "d_state" in mam_args_net
    # MAM may import the shared kernel; nothing else may differ
    extra = [line for line in mam_imports if line not in mat_imports]
    assert all(line.startswith("from selective_scan import") for line in extra), extra
    assert all(line in mam_imports for line in mat_imports if "Literal" not in line), "imports differ"


@pytest.mark.parametrize("name", ["mat_ppo.py", "mam_ppo.py"])
def test_the_test_can_fail(name, tmp_path):
    """A one-character change to the skeleton must be caught."""
    source = (ROOT / name).read_text()
    changed = source.replace("gamma * gae_lambda * not_done_t", "gamma * gae_lambda * not_done_t * 1.0", 1)
    assert changed != source
    (tmp_path / name).write_text(changed)
    skel, *_ = definitions(tmp_path / name)
    original, *_ = definitions(ROOT / name)
    assert skel["compute_gae"] != original["compute_gae"]


SECTIONS = ["\nclass Args:", NETWORK, PPO, "\n# Environment\n", "\n# Below the fold:", "\n# Devices and seeds\n",
            "\n# Command line and saved state\n", "\n# The run folder", "\n# Main:", "\ndef main("]  # fmt: skip


@pytest.mark.parametrize("name", ["mappo.py", "mat_ppo.py", "mam_ppo.py"])
def test_the_algorithm_comes_first_and_the_plumbing_below_one_fold(name):
    source = (ROOT / name).read_text()
    assert all(source.count(mark) == 1 for mark in SECTIONS), [m for m in SECTIONS if source.count(m) != 1]
    where = [source.index(mark) for mark in SECTIONS]
    assert where == sorted(where), "sections out of order"
