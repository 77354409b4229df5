"""scripts/setup.sh's decisions, with pip replaced by a stub that plays each situation:
which installs it runs, when it adds PyTorch's CPU index, and what it says when it stops."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
NO_TORCH = "ERROR: No matching distribution found for torch==2.13.0+cpu"

STUB_PIP = f"""#!/bin/sh
echo "$*" >> "$CALLS"
case "$1" in
  config) [ -n "$STUB_CONFIG_INDEX" ] && echo "global.index-url='https://mirror.example/simple'"; exit 0;;
  uninstall) exit 0;;
esac
case "$STUB" in
  found) exit 0;;
  only-with-index) case "$*" in *extra-index-url*) exit 0;; esac; echo "{NO_TORCH}" >&2; exit 1;;
  nowhere) echo "{NO_TORCH}" >&2; exit 1;;
  other) echo "ERROR: Failed building wheel for something-else" >&2; exit 1;;
esac
"""


def run_setup(tmp_path, stub: str, **env):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "setup.sh"), repo / "scripts")
    shutil.copy(os.path.join(ROOT, "requirements-cpu.txt"), repo)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", "#!/bin/sh\n"), ("pip", STUB_PIP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
    proc = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60,
                          env=clean | {"STUB": stub, "CALLS": str(tmp_path / "calls")} | env)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    installs = [c for c in calls if c.startswith("install")]
    return proc, installs, list((repo / ".venv").glob(".installed-*"))


def test_torch_at_hand_installs_once_as_configured(tmp_path):
    proc, installs, stamp = run_setup(tmp_path, "found")
    assert proc.returncode == 0 and len(installs) == 1 and TORCH_CPU_INDEX not in installs[0] and stamp


def test_no_cpu_torch_retries_once_with_pytorchs_cpu_index(tmp_path):
    proc, installs, stamp = run_setup(tmp_path, "only-with-index")
    assert proc.returncode == 0 and stamp, proc.stderr
    assert len(installs) == 2 and TORCH_CPU_INDEX not in installs[0] and TORCH_CPU_INDEX in installs[1]


@pytest.mark.parametrize("env", [{"PIP_EXTRA_INDEX_URL": "https://mirror.example/simple"},
                                 {"PIP_INDEX_URL": "https://mirror.example/simple"},
                                 {"STUB_CONFIG_INDEX": "1"}])
def test_an_index_of_the_users_own_is_left_alone(tmp_path, env):
    proc, installs, stamp = run_setup(tmp_path, "only-with-index", **env)
    assert proc.returncode == 1 and len(installs) == 1 and not stamp
    assert "Your own pip index is set" in proc.stderr and "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" \
        in proc.stderr


def test_no_cpu_torch_anywhere_stops_naming_the_variable(tmp_path):
    proc, installs, stamp = run_setup(tmp_path, "nowhere")
    assert proc.returncode == 1 and len(installs) == 2 and not stamp
    assert "torch==2.13.0+cpu" in proc.stderr and "Set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" \
        in proc.stderr


def test_another_failure_is_shown_and_not_retried(tmp_path):
    proc, installs, stamp = run_setup(tmp_path, "other")
    assert proc.returncode == 1 and len(installs) == 1 and not stamp
    assert "something-else" in proc.stderr and TORCH_CPU_INDEX not in proc.stdout


def test_an_installed_venv_is_not_touched(tmp_path):
    run_setup(tmp_path, "found")
    (tmp_path / "calls").unlink()
    proc = subprocess.run(["bash", str(tmp_path / "repo" / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env=os.environ | {"STUB": "nowhere", "CALLS": str(tmp_path / "calls")}, timeout=60)
    assert proc.returncode == 0 and not (tmp_path / "calls").exists()
