"""``sgr-ext`` answers ``--help`` and rejects bad arguments without importing torch (issue #14).

Importing torch takes seconds; it used to come first, so every typo cost 3.3-3.5 s (``sgr-ext
train --lr -1`` on the 2-core CI machine, torch 2.14 CPU). Parsing and ``TrainConfig.validate``
now run on torch-free modules (``sgr_ext._options``, ``sgr_ext.trainer.config``/``archs``, the
lazy ``sgr_ext`` and ``sgr_ext.trainer`` packages, ``sgr_ext._lazy``): the same error takes
0.06-0.09 s. Each case runs ``sgr_ext.cli.main`` in a fresh interpreter and checks that torch
was never imported, so an ``import torch`` at the top of ``sgr_ext/cli.py``,
``sgr_ext/trainer/cli.py``, ``sgr_ext/trainer/config.py`` or anything they import fails here.
No time is asserted (shared CI machines): the absence of torch is what makes it fast.
"""
import json
import subprocess
import sys

import pytest

import sgr_ext
import sgr_ext.trainer

# runs main(argv) in a clean interpreter; prints exit status, streams and whether torch came in
PROBE = """
import contextlib, io, json, sys
import sgr_ext.cli
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = sgr_ext.cli.main(json.loads(sys.argv[1]))
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        code = exc.code
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules}))
"""


def run_main(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


HELP = [
    ([], "--help", "usage: sgr-ext"),
    (["train"], "--help", "--nonfinite {raise,skip,warn}"),
    (["demo"], "--help", "--distance {l2,l2_rel,cosine}"),
]


@pytest.mark.parametrize("argv, flag, text", HELP, ids=["top", "train", "demo"])
def test_help_without_torch(argv, flag, text):
    r = run_main([*argv, flag])
    assert (r["code"], r["torch"]) == (0, False), r
    assert text in r["out"]


ERRORS = [
    # argparse level: a bad number, a bad choice, junk for a custom type, an unknown option
    (["train", "--lr", "-1"], "sgr-ext train: error: argument --lr: expected a finite number > 0, got -1"),
    (["train", "--epochs", "ten"], "argument --epochs: expected an integer, got 'ten'"),
    (["train", "--method", "nope"], "argument --method: invalid choice: 'nope'"),
    (["train", "--arch", "nope"], "argument --arch: invalid choice: 'nope'"),
    (["train", "--nonfinite", "ignore"], "argument --nonfinite: invalid choice: 'ignore'"),
    (["train", "--loader", "disk"], "argument --loader: invalid choice: 'disk'"),
    (["train", "--placement", "3,x"], "argument --placement: expected blocks per rank as integers >= 1"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--distance", "l1"], "argument --distance: invalid choice: 'l1'"),
    # TrainConfig.validate: ranges and combinations of plain values
    (["train", "--method", "bp", "--lam", "1"], "sgr-ext train: error: --lam: only applies to --method sgr/sgr-fast"),
    (["train", "--method", "bp", "--nonfinite", "skip"], "--nonfinite skip: applies to the local methods"),
    (["train", "--placement", "2,2"], "--placement: only applies to --parallel module"),
    (["train", "--method", "sgr-fast", "--grad", "forward"], "--grad forward: use --method sgr"),
    (["train", "--num-tangents", "4"], "--num-tangents: only applies to --grad forward"),
    (["train", "--parallel", "data", "--method", "sgr"], "--side handback: not supported with --parallel data"),
    (["demo", "--lr", "-1"], "sgr-ext demo: error: --lr: expected a finite number >= 0, got -1.0"),
    (["demo", "--epochs", "0"], "sgr-ext demo: error: --epochs: expected an int >= 1, got 0"),
]


@pytest.mark.parametrize("argv, message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_bad_argument_exit_2_without_torch(argv, message):
    r = run_main(argv)
    assert (r["code"], r["torch"]) == (2, False), r
    assert message in r["err"]
    assert r["out"] == ""


# ---------------------------------------------------------------- the lazy packages


def test_lazy_packages_list_and_resolve_every_public_name():
    for package in (sgr_ext, sgr_ext.trainer):
        assert set(package.__all__) <= set(dir(package)), package.__name__
        for name in package.__all__:
            assert getattr(package, name) is not None
        with pytest.raises(AttributeError, match="has no attribute 'nope'"):
            package.nope
    from sgr_ext import LocalNet, split  # noqa: F401

    assert sgr_ext.LocalNet is LocalNet and sgr_ext.split is split
    assert sgr_ext.__version__ == "0.1.0"


def test_split_stays_the_function_when_another_module_imports_its_submodule_first():
    # ``from sgr_ext.split import ...`` (as the trainer does) loads the submodule sgr_ext.split, and
    # the import system then binds the package attribute "split" to the module
    code = ("import types, sgr_ext; from sgr_ext.split import model_units; "
            "assert not isinstance(sgr_ext.split, types.ModuleType), sgr_ext.split; "
            "assert sgr_ext.split.__module__ == 'sgr_ext.split'; "
            "assert sgr_ext.heads.conv_head  # submodules load on attribute access, as when imported eagerly")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
