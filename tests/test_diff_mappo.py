"""The diff rule covers mappo.py too: outside its network section, mappo.py reads as mat_ppo.py (and so as
mam_ppo.py: test_diff.py), definition for definition, apart from the differences named here, each intended:
MAT's teacher-forced loss and the paper's agent protocol (--agent-ids, --shuffle-agents), which MAPPO has not,
and each algorithm's tuned defaults."""

import re
from pathlib import Path

from test_diff import definitions

ROOT = Path(__file__).resolve().parents[1]

# (text in mat_ppo.py, the text in mappo.py instead): every one must be found, so none goes stale unnoticed
INTENDED = [
    # the loss: MAT's decoder is teacher-forced on the actions taken; MAPPO's actor reads observations only
    (
        "    # teacher forcing: every agent's logits given the actions the agents before it took\n"
        "    logits, values = network.apply(params, batch.obs, batch.action_mask, batch.actions)",
        "    logits, values = network.apply(params, batch.obs, batch.action_mask)",
    ),
    # --shuffle-agents (MAT, MAM): one agent order per PPO epoch; MAPPO's actor is per agent, its critic global
    (
        "        if args.shuffle_agents:  # one order of the agents per epoch for every per-agent tensor (M, N, ...)\n"
        "            agents = jax.random.permutation(jax.random.fold_in(perm_key, 1), data[0].obs.shape[2])\n"
        "            minibatches = jax.tree.map(lambda x: x[:, :, agents] if x.ndim > 2 else x, minibatches)\n",
        "",
    ),
    # --agent-ids (MAT, MAM): runs saved before the flags existed ran without them; MAPPO's network has its ids
    ("Args(**{**PROTOCOL_OFF, **json.load(f)})", "Args(**json.load(f))"),
    (
        'replace(\n        args, **{k: getattr(saved, k) for k in ("env_id", "num_agents", "agent_ids", *NETWORK_ARGS)}\n'
        "    )",
        'replace(args, **{k: getattr(saved, k) for k in ("env_id", "num_agents", *NETWORK_ARGS)})',
    ),
    ("make_env(args.env_id, args.num_agents, args.agent_ids)", "make_env(args.env_id, args.num_agents)"),
]
MAT_ONLY = {"PROTOCOL_OFF"}  # the flags' values of runs saved before --agent-ids and --shuffle-agents
ARGS_TUNED = {"learning_rate", "num_minibatches", "update_epochs", "clip_coef", "max_grad_norm"}  # defaults
ARGS_MAT_ONLY = {"agent_ids", "shuffle_agents"}


def fields(args_source):
    """Args source -> {field: its lines (declaration and docstring)}, in order."""
    out, name = {}, None
    for line in args_source.splitlines():
        match = re.match(r"    (\w+): ", line)
        if match:
            name = match.group(1)
            out[name] = []
        if name is not None:
            out[name].append(line)
    return out


def apply_intended(skeleton):
    """mat_ppo.py's skeleton with each intended difference replaced by mappo.py's text."""
    skeleton, found = dict(skeleton), set()
    for i, (mat, mappo) in enumerate(INTENDED):
        for name, text in skeleton.items():
            if mat in text:
                skeleton[name] = text.replace(mat, mappo)
                found.add(i)
    return skeleton, [INTENDED[i][0] for i in range(len(INTENDED)) if i not in found]


def test_mappo_differs_from_mat_only_in_the_network_and_the_named_differences():
    mappo_skel, mappo_net, mappo_args, mappo_imports, _ = definitions(ROOT / "mappo.py")
    mat_skel, _, mat_args, mat_imports, _ = definitions(ROOT / "mat_ppo.py")
    assert "build_network" in mappo_net
    mat_skel, stale = apply_intended(mat_skel)
    assert not stale, f"intended differences no longer found in mat_ppo.py (update INTENDED): {stale}"
    assert set(mat_skel) - set(mappo_skel) == MAT_ONLY and set(mappo_skel) <= set(mat_skel)
    assert list(mappo_skel) == [n for n in mat_skel if n not in MAT_ONLY], "definitions in another order"
    for name in mappo_skel:
        assert mappo_skel[name] == mat_skel[name], f"{name} differs between mappo.py and mat_ppo.py"
    a, b = fields(mappo_args), fields(mat_args)
    assert list(a) == [f for f in b if f not in ARGS_MAT_ONLY], "Args fields differ"
    for f in a:
        assert f in ARGS_TUNED or a[f] == b[f], f"Args.{f} differs"
    # MAT's --decode flag brings typing.Literal; nothing else may differ
    assert [line.replace("Literal, ", "") for line in mat_imports] == mappo_imports


def test_the_mappo_diff_test_can_fail(tmp_path):
    source = (ROOT / "mappo.py").read_text()
    changed = source.replace("ep_length + 1", "ep_length + 2", 1)
    assert changed != source
    (tmp_path / "mappo.py").write_text(changed)
    mat_skel, _ = apply_intended(definitions(ROOT / "mat_ppo.py")[0])
    assert definitions(tmp_path / "mappo.py")[0]["rollout"] != mat_skel["rollout"]
