"""bash/ sweeps: DRY_RUN commands pass the samplers' own validation; GPU wait; SLURM launch."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from utils.errors import UsageError

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASH = ROOT / "bash"
SWEEPS = ["edm2_swg.sh", "edm2_wmg_swg.sh", "edm2_cfg_swg.sh", "dit_swg.sh", "dit_cfg_swg.sh"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TORCHRUN_ARGS", "EXTRA_ARGS")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script: str, *, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(BASH / script)], env=_env(**env), capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_commands(script: str, **env) -> list[list[str]]:
    """The commands a sweep prints under DRY_RUN=1, split like a shell would."""
    proc = run_script(script, DRY_RUN=1, **env)
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def split_launcher(cmd: list[str]) -> tuple[list[str], str, list[str]]:
    """``torchrun <launcher args> script.py <args>`` -> (launcher args, script, script args)."""
    assert cmd[0] == "torchrun", cmd
    i = next(i for i, w in enumerate(cmd) if w.endswith(".py"))
    return cmd[1:i], cmd[i], cmd[i + 1:]


def validate(script: str, args: list[str]):
    """Parse ``args`` with the sampler's click command and run its validation (no I/O, no sampling)."""
    if script == "sample_edm2.py":
        import sample_edm2

        return sample_edm2.settings(list(args))
    if script == "sample_dit.py":
        import sample_dit

        return sample_dit.settings(list(args))
    raise AssertionError(f"unexpected script {script}")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative --outdir values are checked against a scratch folder


@pytest.mark.parametrize("script", SWEEPS)
def test_default_sweep_passes_cli_validation(script):
    cmds = dry_commands(script, nproc_per_node=4)
    assert cmds, "a sweep prints at least one command"
    for cmd in cmds:
        launcher, sampler, args = split_launcher(cmd)
        assert launcher == ["--standalone", "--nproc_per_node=4"]
        validate(sampler, args)


def test_edm2_defaults_are_the_papers_settings():
    from networks.zoo import MODELS

    swg = [validate(*split_launcher(c)[1:]) for c in dry_commands("edm2_swg.sh")]
    assert [c.guidance.weights for c in swg] == [(0.2,), (1.1,)]
    assert all(c.guidance.method == "swg" and c.guidance.window_size == (40,) and c.guidance.window_steps == (2,) and c.guidance.masked
               and len(c.seeds) == 50000 and c.metrics == ("fid", "fd_dinov2") for c in swg)
    assert swg[0].net_pos_pkl.endswith("edm2-img512-s/edm2-img512-s-2147483-0.100.pkl")

    expected = {("s", "RT"): ("raw-img512-s", "raw-img512-s-T16", (1.2, 0.25)),
                ("s", "RCT"): ("raw-img512-s", "raw-img512-xs-T16", (1.2, 0.14)),
                ("xxl", "RT"): ("raw-img512-xxl", "raw-img512-xxl-T8", (1.2, 0.25)),
                ("xxl", "RCT"): ("raw-img512-xxl", "raw-img512-m-T8", (1.2, 0.14))}
    for (size, neg), (pos_name, neg_name, weight) in expected.items():
        (cmd,) = dry_commands("edm2_wmg_swg.sh", model_size=size, negative=neg)
        cfg = validate(*split_launcher(cmd)[1:])
        assert (cfg.net_pos_pkl, cfg.net_neg_pkl, cfg.guidance.weights) == (MODELS[pos_name], MODELS[neg_name], weight)
        assert cfg.guidance.method == "wmg-swg"
        assert f"/IN512/{size}/{neg}_SWG/" in cfg.outdir
    assert MODELS["raw-img512-xxl-T8"].endswith("edm2-img512-xxl/edm2-img512-xxl-0268435-0.100.pkl")

    (cmd,) = dry_commands("edm2_cfg_swg.sh")
    cfg = validate(*split_launcher(cmd)[1:])
    assert (cfg.guidance.method, cfg.guidance.weights) == ("cfg-swg", (0.3, 0.3))
    assert cfg.net_neg_pkl == MODELS["raw-img512-xs-uncond"]


def test_dit_defaults_are_the_papers_settings():
    swg = [validate(*split_launcher(c)[1:]) for c in dry_commands("dit_swg.sh")]
    assert [(c.guidance.method, c.guidance.weights, c.guidance.masked, c.guidance.window_size) for c in swg] == \
        [("swg", (0.5,), True, (20,)), ("swg", (1.5,), True, (20,))]
    assert all(c.save_tar and len(c.seeds) == 50000 and c.batch == 32 for c in swg)
    (cmd,) = dry_commands("dit_cfg_swg.sh")
    cfg = validate(*split_launcher(cmd)[1:])
    assert (cfg.guidance.method, cfg.guidance.weights, cfg.guidance.masked) == ("cfg-swg", (0.6, 0.5), True)


def test_environment_overrides_and_weight_list():
    cmds = dry_commands("edm2_swg.sh", g_weight="0.1 0.25 0.4", seeds="0-9", batch=8, swg_sizes=32,
                        scale_window_guide=0, base_out_dir="out dir", metrics="none")
    cfgs = [validate(*split_launcher(c)[1:]) for c in cmds]
    assert [c.guidance.weights for c in cfgs] == [(0.1,), (0.25,), (0.4,)]
    assert all(c.seeds == list(range(10)) and c.batch == 8 and c.guidance.window_size == (32,) and not c.guidance.masked
               and c.metrics == () for c in cfgs)
    assert [c.outdir for c in cfgs] == [f"out dir/IN512/s/SWG/{w}/samples" for w in ("0.1", "0.25", "0.4")]

    cmds = dry_commands("dit_cfg_swg.sh", g_weight="0.7,0.1 0.6,0.5", mask=0, save_tar=0, swg_sizes=16)
    cfgs = [validate(*split_launcher(c)[1:]) for c in cmds]
    assert [(c.guidance.weights, c.guidance.masked, c.save_tar, c.guidance.window_size) for c in cfgs] == \
        [((0.7, 0.1), False, False, (16,)), ((0.6, 0.5), False, False, (16,))]


def test_cli_validation_catches_bad_sweeps():
    """The check is real: values the samplers refuse fail here, not hours later on the cluster."""
    (cmd,) = dry_commands("edm2_wmg_swg.sh", g_weight="1.2")  # wmg-swg needs two weights
    with pytest.raises(UsageError, match="takes 2 weight"):
        validate(*split_launcher(cmd)[1:])
    (cmd,) = dry_commands("dit_swg.sh", g_weight="0.5", swg_sizes=40)  # 40 > the 32x32 latent
    with pytest.raises(UsageError):
        validate(*split_launcher(cmd)[1:])
    (cmd,) = dry_commands("edm2_swg.sh", g_weight="0.2", EXTRA_ARGS="--no_such_flag 1")
    import click
    with pytest.raises(click.UsageError):
        validate(*split_launcher(cmd)[1:])


@pytest.mark.parametrize("script,env,needle", [
    ("edm2_wmg_swg.sh", {"negative": "RC"}, "negative=RC"),
    ("edm2_swg.sh", {"model_size": "m"}, "model_size=m"),
    ("dit_cfg_swg.sh", {"g_weight": "0.6"}, "pair"),
])
def test_bad_script_variables_exit_2(script, env, needle):
    proc = run_script(script, check=False, DRY_RUN=1, **env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert needle in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_torchrun_args_get_fresh_rendezvous_per_run():
    cmds = dry_commands("dit_swg.sh", TORCHRUN_ARGS="--nnodes=2 --rdzv_endpoint=node0:{port} --rdzv_id=7-{run}",
                        MASTER_PORT=29600)
    assert [split_launcher(c)[0] for c in cmds] == [
        ["--nnodes=2", "--rdzv_endpoint=node0:29600", "--rdzv_id=7-0"],
        ["--nnodes=2", "--rdzv_endpoint=node0:29601", "--rdzv_id=7-1"]]


def _fake_bin(folder: pathlib.Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_real_launch_runs_each_weight_and_reports_failures(tmp_path):
    """Without DRY_RUN the launcher really runs; a failed run does not stop the sweep but fails it."""
    log = tmp_path / "calls.txt"
    _fake_bin(tmp_path, "fake_torchrun",
              f'echo "$*" >> {log}\ncase "$*" in *"--g_weight 1.1"*) exit 5 ;; esac\nexit 0\n')
    proc = run_script("edm2_swg.sh", check=False, PYTHON_LAUNCHER=str(tmp_path / "fake_torchrun"), nproc_per_node=2)
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "--g_weight 0.2" in calls[0] and "--g_weight 1.1" in calls[1]
    assert calls[0].startswith("--standalone --nproc_per_node=2 sample_edm2.py")
    assert proc.returncode == 1 and "1 run(s) failed" in proc.stderr


NVSMI = """\
if [ "$1" = "-L" ]; then echo "GPU 0: fake"; echo "GPU 1: fake"; echo "GPU 2: fake"; exit 0; fi
state={state}
n=$(cat "$state" 2>/dev/null || echo 0); echo $((n + 1)) > "$state"
if [ "$n" -lt {busy_polls} ]; then printf '0, 100\\n1, 200\\n2, 50\\n'; else printf '0, 40000\\n1, 1000\\n2, 80000\\n'; fi
"""


def _gpu_wait(tmp_path, busy_polls: int, *args, **env):
    _fake_bin(tmp_path, "nvidia-smi", NVSMI.format(state=tmp_path / "polls", busy_polls=busy_polls))
    cmd = ["bash", str(BASH / "gpu_wait.sh"), *args]
    return subprocess.run(cmd, env=_env(PATH=f"{tmp_path}:{os.environ['PATH']}", **env), capture_output=True,
                          text=True, timeout=30)


def test_gpu_wait_waits_then_picks_the_freest_gpus(tmp_path):
    proc = _gpu_wait(tmp_path, 2, "--gpus", "2", "--min-free-mb", "30000", "--interval", "0", "--",
                     "bash", "-c", 'echo "visible=$CUDA_VISIBLE_DEVICES"; exit 7')
    assert proc.returncode == 7  # the command's own status
    assert proc.stdout.strip() == "visible=2,0"  # most free memory first, GPU 1 has too little
    assert (tmp_path / "polls").read_text().strip() == "3"  # two busy checks, then launched
    assert proc.stderr.count("checking again") == 2


def test_gpu_wait_respects_visible_devices_and_timeout(tmp_path):
    proc = _gpu_wait(tmp_path, 0, "--gpus", "2", "--interval", "0", "--timeout", "1", "--", "true",
                     CUDA_VISIBLE_DEVICES="0,1")
    assert proc.returncode == 3 and "gave up" in proc.stderr
    proc = _gpu_wait(tmp_path, 0, "--gpus", "x", "--", "true")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --gpus")


def test_slurm_example_launches_one_torchrun_per_node(tmp_path):
    _fake_bin(tmp_path, "scontrol", 'printf "nodeA\\nnodeB\\n"\n')
    # srun stand-in: drop its options and run the task once per node, like --ntasks-per-node=1.
    _fake_bin(tmp_path, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                                'for n in $(seq "$SLURM_NNODES"); do SLURM_NODEID=$((n-1)) "$@" || exit $?; done\n')
    env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}", DRY_RUN=1, SLURM_NNODES=2, SLURM_JOB_ID=42,
               SLURM_JOB_NODELIST="node[A-B]", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE=4, g_weight="0.5 1.5",
               SWEEP="dit_swg.sh")
    proc = subprocess.run(["bash", str(BASH / "slurm_example.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert len(cmds) == 4  # 2 nodes x 2 weights
    launchers = [split_launcher(c)[0] for c in cmds]
    for i, launcher in enumerate(launchers):
        run = i % 2
        assert launcher == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                            f"--rdzv_endpoint=nodeA:{29500 + run}", f"--rdzv_id=42-{run}"]
    for cmd in cmds:
        validate(*split_launcher(cmd)[1:])


# srun stand-in that acts like slurmstepd: one task per node, each in its own process group, marked as a
# step (SLURM_STEP_ID); a signal to srun reaches every process of every task (the sweep and its launcher).
FAKE_SRUN = """\
while [[ "$1" == --* ]]; do shift; done
pids=()
forward() { for p in "${pids[@]}"; do kill -"$1" -- -"$p" 2>/dev/null; done; }
trap 'forward TERM' TERM
trap 'forward USR1' USR1
for n in $(seq "$SLURM_NNODES"); do
    SLURM_NODEID=$((n-1)) SLURM_STEP_ID=0 setsid "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
    while true; do wait "$p"; s=$?; kill -0 "$p" 2>/dev/null || break; done
    [ "$s" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$s
done
exit $rc
"""

# torchrun stand-in: records its start and the signals it gets; a SIGTERM stops it as the samplers stop (75).
FAKE_TORCHRUN = """\
trap 'echo "TERM $SLURM_NODEID" >> {log}; exit 75' TERM
trap 'echo "USR1 $SLURM_NODEID" >> {log}; exit 75' USR1
echo "start $SLURM_NODEID $*" >> {log}
sleep 60 &
wait
"""


def _sbatch_options() -> dict:
    lines = (BASH / "slurm_example.sbatch").read_text().splitlines()
    opts = [line.split(None, 1)[1].lstrip("-").split("=", 1) for line in lines if line.startswith("#SBATCH --")]
    return {kv[0]: kv[1] if len(kv) > 1 else True for kv in opts}


def test_slurm_example_passes_bash_n_and_asks_for_requeue_and_a_warning_signal():
    subprocess.run(["bash", "-n", str(BASH / "slurm_example.sbatch")], check=True)
    subprocess.run(["bash", "-n", str(BASH / "common.sh")], check=True)
    opts = _sbatch_options()
    assert opts["requeue"] is True
    signal_name, seconds = opts["signal"].removeprefix("B:").split("@")
    assert opts["signal"].startswith("B:") and signal_name == "USR1" and int(seconds) >= 60


@pytest.mark.parametrize("sig,requeued", [("USR1", True), ("TERM", False)])
def test_slurm_example_stops_the_sweep_on_a_signal_and_requeues_on_usr1(tmp_path, sig, requeued):
    import signal as sg
    import time

    log = tmp_path / "log.txt"
    _fake_bin(tmp_path, "scontrol", f'if [ "$1" = requeue ]; then echo "requeue $2" >> {log}; exit 0; fi\n'
                                    'printf "nodeA\\nnodeB\\n"\n')
    _fake_bin(tmp_path, "srun", FAKE_SRUN)
    _fake_bin(tmp_path, "fake_torchrun", FAKE_TORCHRUN.format(log=log))
    env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_NNODES=2, SLURM_JOB_ID=42, SLURM_RESTART_COUNT=1,
               SLURM_JOB_NODELIST="node[A-B]", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE=1, g_weight="0.5 1.5",
               SWEEP="dit_swg.sh", PYTHON_LAUNCHER=str(tmp_path / "fake_torchrun"))
    proc = subprocess.Popen(["bash", str(BASH / "slurm_example.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while (not log.exists() or log.read_text().count("start") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(sg, f"SIG{sig}"))
    _, err = proc.communicate(timeout=30)
    calls = log.read_text().splitlines()
    starts = [c for c in calls if c.startswith("start")]
    assert len(starts) == 2 and all("--g-scale 0.5" in c for c in starts)  # the second weight never started
    assert sorted(c for c in calls if c.startswith(("TERM", "USR1"))) == ["TERM 0", "TERM 1"]  # once each
    assert "requeued (1 time(s)): resuming" in err
    assert ("requeue 42" in calls) == requeued
    assert proc.returncode == (0 if requeued else 75), err
