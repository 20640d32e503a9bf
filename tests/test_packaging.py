"""The Triton code in kernels/ installs as `flamingo_fast.kernels`, from a regular install too, and never as a
top-level `kernels` (PyPI has an unrelated package of that name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, flamingo_fast, flamingo_fast.kernels as k
print(json.dumps({"pkg": flamingo_fast.__file__, "kernels": k.__file__,
                  "top_level_kernels": importlib.util.find_spec("kernels") is not None}))
"""


def _probe(env: dict[str, str], cwd: Path) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_regular_install_provides_flamingo_fast_kernels(tmp_path):
    target = tmp_path / "site"
    # No build isolation and no deps: nothing is fetched from the network at test time.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    assert (target / "flamingo_fast" / "kernels" / "__init__.py").is_file()
    # Every subpackage of the source tree is installed, with all its modules.
    source = REPO / "flamingo_fast"
    for init in sorted(source.glob("*/__init__.py")):
        for module in sorted(init.parent.glob("*.py")):
            installed = target / module.relative_to(REPO)
            assert installed.is_file(), f"{module.relative_to(REPO)} is not installed: missing from setup.py's packages"
    assert not (target / "kernels").exists(), "installed a top-level 'kernels' package that would shadow PyPI's"
    env = {**os.environ, "PYTHONPATH": str(target)}
    found = _probe(env, cwd=tmp_path)
    assert found["pkg"].startswith(str(target)) and found["kernels"].startswith(str(target))
    assert not found["top_level_kernels"], "a top-level 'kernels' module is importable from the install"


def test_editable_install_maps_kernels_folder(tmp_path):
    """The installed flamingo_fast.kernels is the `kernels/` folder beside the installed package, in whichever
    checkout the environment was installed from (a clone may reuse another checkout's environment)."""
    found = _probe(dict(os.environ), cwd=tmp_path)
    checkout = Path(found["pkg"]).parent.parent
    assert Path(found["kernels"]).parent == checkout / "kernels"
    assert (checkout / "setup.py").is_file(), f"{checkout} is not a checkout: expected an editable install"
    assert not found["top_level_kernels"], "a top-level 'kernels' module is importable outside the repo root"


def _setup_arguments() -> dict:
    """setup()'s keyword arguments, read from setup.py without running it."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    wanted = ("install_requires", "extras_require")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in wanted}


def test_openflamingo_extra_leaves_torch_alone_and_safetensors_is_installed():
    """`pip install -e '.[openflamingo]'` must not resolve open-flamingo's pins (torch 2.0.1) or transformers 5 into
    the environment: the comparison environment is `make setup-openflamingo`. safetensors (no torch dependency)
    is a plain requirement, so load_openflamingo reads .safetensors files in every install."""
    args = _setup_arguments()
    assert "safetensors" in args["install_requires"]
    assert args["extras_require"]["openflamingo"] == ["safetensors"]
    import safetensors.torch  # noqa: F401  (installed in this environment by the requirement above)
