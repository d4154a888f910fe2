"""`diff mat_ppo.py mam_ppo.py` shows the network and nothing else: every top-level definition outside the
network section is identical to the character, and so are the Args fields outside its network block."""

import ast
import io
import re
import tokenize
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


FOLD = "\n# Below the fold:"
SECTIONS = ["\nclass Args:", NETWORK, PPO, "\n# Environment\n", FOLD, "\n# Devices and seeds\n",
            "\n# Command line and saved state\n", "\n# Jumanji and SMAX envs\n", "\n# The run folder", "\n# Main:",
            "\ndef main("]  # fmt: skip
SCRIPTS = ["mappo.py", "mat_ppo.py", "mam_ppo.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_algorithm_comes_first_and_the_plumbing_below_one_fold(name):
    source = (ROOT / name).read_text()
    assert all(source.count(mark) == 1 for mark in SECTIONS), [m for m in SECTIONS if source.count(m) != 1]
    where = [source.index(mark) for mark in SECTIONS]
    assert where == sorted(where), "sections out of order"


# the plumbing's concerns, which the caller applies: devices (a split function), video (a record function)
PLUMBING = {"mesh", "shard", "capture_video"}


def names_across_the_fold(source):
    """-> (the identifiers used above the fold outside Args and the imports, the top-level names defined below)."""
    fold = source[: source.index(FOLD)].count("\n") + 1
    used, below = set(), set()
    for node in ast.parse(source).body:
        if node.lineno > fold:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                below.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                below.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif not isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "name", "") != "Args":
            for n in ast.walk(node):
                if isinstance(n, ast.Name):
                    used.add(n.id)
                elif isinstance(n, ast.Attribute):
                    used.add(n.attr)
                elif isinstance(n, ast.arg):
                    used.add(n.arg)
    return used, below


@pytest.mark.parametrize("name", SCRIPTS)
def test_above_the_fold_names_nothing_below_it(name):
    """The algorithm reads alone: Args, the network, PPO and the Env contract use no name defined below the fold,
    and neither devices nor video are their business."""
    source = (ROOT / name).read_text()
    used, below = names_across_the_fold(source)
    assert {"make_env", "main", "train", "RunError"} <= below
    assert not used & below, f"above the fold, {name} names {sorted(used & below)}, defined below it"
    assert not used & PLUMBING, f"above the fold, {name} names {sorted(used & PLUMBING)}"
    mentioned = mentions_across_the_fold(source, below)
    assert not mentioned, f"above the fold, {name}'s comments and docstrings mention {sorted(mentioned)}"


def mentions_across_the_fold(source, below):
    """The names defined below the fold that the comments and docstrings from the network to the fold mention,
    among those that read as code (snake_case, CamelCase), not as words."""
    text = source[source.index(NETWORK) : source.index(FOLD)]
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    prose = [t.string for t in tokens if t.type in (tokenize.COMMENT, tokenize.STRING)]
    words = set(re.findall(r"[A-Za-z_]\w*", " ".join(prose)))
    return words & {n for n in below if "_" in n or re.search(r"[a-z][A-Z]", n)}


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_fold_test_can_fail(name):
    source = (ROOT / name).read_text()
    for added in [
        "ENVS_USED = ENVS",
        "def f(args):\n    return make_env(args.env_id)",
        "def f(mesh):\n    pass",
    ]:
        changed = source.replace(FOLD, f"\n{added}\n\n{FOLD}", 1)
        used, below = names_across_the_fold(changed)
        assert used & (below | PLUMBING), added
    changed = source.replace(FOLD, "\n# the envs: see make_env\n" + FOLD, 1)
    assert mentions_across_the_fold(changed, names_across_the_fold(changed)[1]) == {"make_env"}
