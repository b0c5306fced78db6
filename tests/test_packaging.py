"""The package installs and imports as ``fusedformers.kernels`` / ``fusedformers.models`` / ``fusedformers.bench``
only: nothing in the checkout imports a bare ``kernels`` or ``models``, a user's own ``models/`` and ``kernels/``
packages do not shadow ours, and the wheel holds no top-level ``kernels/`` or ``models/``."""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BARE_IMPORT = re.compile(r"^\s*(from|import)\s+(kernels|models|bench)\b"
                         r"|import_module\(f?[\"'](kernels|models|bench)\.|-m\s+(bench|kernels|models)\b"
                         # a bare import in a script string too (e.g. import torch, kernels), not from-imports
                         r"|(?:^|[;(\"'])\s*import\s+(?:[\w.]+\s*,\s*)*(kernels|models|bench)\b(?!\.)", re.M)
IMPORT_ALL = ("import sys, fusedformers.kernels, fusedformers.models.llama, fusedformers.models.bart; "
              "assert not {'kernels', 'models', 'bench'} & set(sys.modules), sorted(sys.modules); "
              "print(fusedformers.kernels.__file__)")


def _source_files():
    """Every Python file of the package and the tests, and the docs and scripts that show commands."""
    for folder in ("kernels", "models", "bench", "tests"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(dirpath, name) for name in names if name.endswith((".py", ".md", ".sh")))
    yield from (os.path.join(ROOT, name) for name in ("README.md", "dev", "setup.py"))


def test_no_bare_kernels_or_models_imports():
    offenders = []
    for path in _source_files():
        with open(path) as f:
            text = f.read()
        offenders += [f"{os.path.relpath(path, ROOT)}: {m.group(0).strip()}" for m in BARE_IMPORT.finditer(text)]
    assert not offenders, offenders


def _shadowing_packages(directory):
    """A user's project: its own ``models`` and ``kernels`` packages, which fail loudly if anything imports them."""
    for name in ("models", "kernels"):
        os.makedirs(os.path.join(directory, name))
        with open(os.path.join(directory, name, "__init__.py"), "w") as f:
            f.write(f"raise ImportError('the user project\\'s own {name} package was imported')\n")


def test_user_packages_named_models_and_kernels_do_not_shadow_ours(tmp_path):
    _shadowing_packages(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.realpath(result.stdout.strip()).startswith(os.path.join(os.path.realpath(ROOT), "kernels")), \
        result.stdout


@pytest.mark.slow
def test_wheel_installs_the_namespace_only(tmp_path):
    """Build the wheel from a copy of the package's files, check its top-level entries, install it into a
    directory and import it from a user project with its own ``models/`` and ``kernels/``."""
    source = tmp_path / "source"
    for folder in ("kernels", "models", "bench"):
        shutil.copytree(os.path.join(ROOT, folder), source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("fusedformers-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert top_level == {"fusedformers", wheel.name.split("-py")[0] + ".dist-info"}, top_level
    assert {"fusedformers/kernels/attention.py", "fusedformers/models/llama.py", "fusedformers/bench/__main__.py",
            "fusedformers/kernels/interpreter.py"} <= names
    assert "fusedformers/__init__.py" not in names  # a PEP 420 namespace, shared with nothing else of ours

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    project = tmp_path / "user_project"
    project.mkdir()
    _shadowing_packages(project)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=project, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(site / "fusedformers" / "kernels")), result.stdout


def test_imports_without_numpy():
    """The package's dependencies are torch, triton and safetensors: numpy (which the interpreter fixes use) is
    imported only when Triton's interpreter is on."""
    script = ("import sys; sys.modules['numpy'] = None\n"
              "import fusedformers.kernels, fusedformers.models.llama, fusedformers.models.bart\nprint('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
