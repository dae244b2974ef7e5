"""Types a checker can use: mypy (default settings) on the package and on a typed user script.

* ``fundp`` itself type-checks cleanly (it ships ``py.typed``, so users' checkers read it);
* ``tests/typed_script.py``, a DP training loop written as a user would, type-checks cleanly,
  including ``assert_type(step(...), StepResult)`` (``dp_step`` returns a ``Step`` protocol, not a
  bare ``Callable`` whose result is ``Any``);
* misuse is caught statically: a misspelled string option and a positional ``mask``;
* the script runs and learns.

One mypy run checks the package and the script together; with the misuse check and the run of
the script this takes 30-70 s on 2 cores, so the module is marked ``slow`` (CI runs it).  mypy's
cache lives in the system's temporary directory, outside the repository.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "tests/typed_script.py"
CACHE = os.path.join(tempfile.gettempdir(), "fundp-mypy-cache")


def run_mypy(*targets, extra_path=None):
    env = dict(os.environ)
    env["MYPYPATH"] = str(ROOT)  # find the fundp sources here, not through the editable install's import hook
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", CACHE, "--no-error-summary", *targets],
        cwd=extra_path or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    return result, errors


@pytest.fixture(scope="module")
def package_and_script():
    return run_mypy("fundp", SCRIPT)


def test_typed_user_script_is_clean(package_and_script):
    result, errors = package_and_script
    script_errors = [line for line in errors if line.startswith(SCRIPT)]
    assert not script_errors, "\n".join(script_errors)
    assert "Traceback" not in result.stderr, result.stderr


def test_fundp_package_is_mypy_clean(package_and_script):
    result, errors = package_and_script
    assert result.returncode == 0 and not errors, "mypy fundp reports:\n" + "\n".join(errors or [result.stdout, result.stderr])


def test_misuse_is_caught_statically(tmp_path):
    misuse = tmp_path / "misuse.py"
    misuse.write_text(
        textwrap.dedent(
            """
            import torch
            import fundp

            def loss_fn(params: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
                return batch @ params["w"]

            step = fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, clip_style="flatt")
            params, batch, key = {"w": torch.zeros(2)}, torch.ones(4, 2), fundp.random.key(0)
            out = step(params, batch, key, None, torch.ones(4, dtype=torch.bool))
            out.gradz
            """
        )
    )
    result, errors = run_mypy(str(misuse), extra_path=tmp_path)
    text = "\n".join(errors)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "misuse.py:8: error" in text and "clip_style" in text  # Literal option, misspelled
    assert "misuse.py:10: error" in text  # ledger and mask are keyword-only
    assert "misuse.py:11: error" in text and "gradz" in text  # StepResult has no such field


def test_typed_script_runs_and_learns():
    result = subprocess.run(
        [sys.executable, SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["steps"] == 40
    assert 0 < report["epsilon"] < 20
    assert report["final_loss"] < report["first_loss"] and report["accuracy"] > 0.8
