"""The `efficientllava` command in-process: one-line errors with exit code 2, and `evaluate` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from efficientllava.cli import main
from efficientllava.models.tiny import META_FILE, TinyConfig, build_tiny
from efficientllava.prompting import COMPACT

REPO = Path(__file__).resolve().parents[1]
SMALL = TinyConfig(text_layers=2, text_hidden=64, text_intermediate=128, vision_layers=1)
FEWSHOT = ["--data", "synthetic", "--split", "fewshot", "--n-shots", "8", "--heldout-size", "8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A small random tiny LLaVA saved in HF layout, with its compact prompt format recorded."""
    model, processor = build_tiny(SMALL)
    path = tmp_path_factory.mktemp("cli") / "small"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / META_FILE).write_text(json.dumps({"prompt_format": COMPACT}))
    return str(path)


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    """Keep caches (tiny model, variant banks) inside each test's tmp_path."""
    monkeypatch.setenv("EFFICIENTLLAVA_HOME", str(tmp_path / "home"))


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with exactly one `error: ...` line on stderr and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def _not_an_experiment(tmp_path: Path) -> Path:
    folder = tmp_path / "notexp"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return folder


def test_evaluate_unknown_model(capsys):
    _fails(capsys, ["evaluate", "--model", "tinyy"], "unknown model spec 'tinyy'")


def test_evaluate_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    folder = _not_an_experiment(tmp_path)
    _fails(capsys, ["evaluate", "--model", str(folder)], str(folder), "no config.json")


def test_evaluate_unknown_dataset(capsys, checkpoint):
    _fails(
        capsys, ["evaluate", "--data", "nosuchdata", "--model", checkpoint], "invalid choice: 'nosuchdata'",
        "synthetic", "scienceqa",
    )


@pytest.mark.parametrize(
    "flag, value, needle",
    [("--method", "sparsgpt", "sparsegpt"), ("--data", "sciencqa", "scienceqa"), ("--pattern", "2-4", "N:M"),
     ("--granularity", "blocks", "sublayer")],
)
def test_evaluate_typos_fail_before_any_model_loads(capsys, flag, value, needle):
    # "tinyy" cannot load: the typo must be reported instead, from the registries' names.
    _fails(capsys, ["evaluate", "--model", "tinyy", flag, value], value, needle)


def test_version(capsys):
    from efficientllava import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"efficientllava {__version__}"


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--device", "gpu", "unknown device 'gpu'"),
        ("--dtype", "fp64", "invalid choice: 'fp64'"),
        ("--uniform", "1.5", "--uniform 1.5"),
        ("--uniform", "-0.1", "[0, 1)"),
        ("--batch-size", "0", "--batch-size 0"),
        ("--granularity", "block", "invalid choice: 'block'"),
    ],
)
def test_evaluate_bad_options(capsys, checkpoint, flag, value, needle):
    uniform = [] if flag == "--uniform" else ["--uniform", "0.5", "--method", "magnitude"]
    _fails(capsys, ["evaluate", "--model", checkpoint, *FEWSHOT, *uniform, flag, value], needle)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--batch-size", "0"], "--batch-size 0"),
        (["--uniform", "1.5"], "--uniform 1.5"),
        (["--policy", "p.json"], "p.json"),
    ],
)
def test_evaluate_argument_errors_come_before_loading(capsys, tmp_path, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    # An unloadable model: the argument error must be reported first (not after loading a large model).
    _fails(capsys, ["evaluate", "--model", "tinyy", *extra], needle)


def test_evaluate_missing_policy_file(capsys, checkpoint, tmp_path):
    missing = tmp_path / "policy.json"
    _fails(capsys, ["evaluate", "--model", checkpoint, *FEWSHOT, "--policy", str(missing)], str(missing))


def test_search_missing_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails(capsys, ["search", "no-such-file.yaml"], "no-such-file.yaml")


def test_search_unknown_key(capsys, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: x\nspace: {REPO / 'search_spaces' / 'tiny.yaml'}\nbogus_key: 1\n")
    _fails(capsys, ["search", str(config)], str(config), "bogus_key")


@pytest.mark.parametrize("command", [["resume"], ["trials"], ["export"]])
def test_commands_on_a_directory_that_is_not_an_experiment(capsys, tmp_path, command):
    folder = _not_an_experiment(tmp_path)
    extra = ["--out", str(tmp_path / "x")] if command == ["export"] else []
    _fails(capsys, [*command, str(folder), *extra], str(folder), "not an experiment")
    assert not (tmp_path / "x").exists()


def test_evaluate_checkpoint(capsys, checkpoint):
    assert main(["evaluate", "--model", checkpoint, *FEWSHOT, "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    out = captured.out
    assert f"model {checkpoint}: " in out and " M parameters" in out and "float32" in out
    line = next(line for line in out.splitlines() if line.startswith("accuracy"))
    assert "on synthetic/fewshot" in line and "samples/s" in line and "/8)" in line


def test_evaluate_uniform_policy(capsys, checkpoint, tmp_path):
    argv = ["evaluate", "--model", checkpoint, *FEWSHOT, "--uniform", "0.5", "--method", "magnitude"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert " M parameters" in out
    policy = next(line for line in out.splitlines() if line.startswith("policy "))
    assert "layer.0=0.50" in policy and "layer.1=0.50" in policy and "(magnitude, unstructured)" in policy
    result = next(line for line in out.splitlines() if line.startswith("accuracy"))
    assert "mean sparsity 0.500" in result and "samples/s" in result and "(n=8)" in result
    # The variant bank was cached under EFFICIENTLLAVA_HOME.
    assert list((tmp_path / "home" / "banks").iterdir())


def test_module_help():
    proc = subprocess.run(
        [sys.executable, "-m", "efficientllava.cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("search", "resume", "trials", "report", "export", "evaluate"):
        assert command in proc.stdout


def test_resume_of_an_experiment_from_before_format_2_says_what_to_do(capsys, tmp_path):
    """An experiment directory written by 0.1 (no format in state.json) is refused in one line, before Ray starts."""
    import yaml

    from efficientllava.config import config_from_dict, config_to_dict

    old = tmp_path / "old"
    (old / "trials").mkdir(parents=True)
    cfg = config_from_dict({"name": "old", "space": str(REPO / "search_spaces" / "tiny.yaml")}, "old.yaml")
    (old / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (old / "state.json").write_text(json.dumps({  # what 0.1 wrote
        "status": "running", "round": 0, "history": [], "updated_at": "2026-11-20T10:00:00",
        "state": {"round": 0, "projector_version": 0, "projector_path": None, "space_path": "/x/round-0.yaml"}}))
    line = _fails(capsys, ["resume", str(old)], str(old), "older efficientllava", "format 1",
                  "start a new search with `efficientllava search")
    assert "\n" not in line
    _fails(capsys, ["export", str(old), "--out", str(tmp_path / "x")], "older efficientllava")
