"""The import graph: what each package may import, checked in fresh interpreters (this
process has imported everything already), and the XLA flags `sharding` sets on import."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jaxfusion
from sharding import LATENCY_HIDING_FLAG, with_latency_hiding

ROOT = Path(jaxfusion.__file__).parent.parent
BENCH = ROOT / "jaxfusion" / "bench"
# The project's top-level packages, lowest layers first.
PACKAGES = ("nnxtools", "sharding", "convert", "jaxfusion")
HEAVY = ("jax", "jaxlib", "flax", "numpy", "torch")


def fresh_python(code: str, **env: str) -> dict:
    """Runs `code` in a new interpreter (with `env` added to the environment, or removed
    where a value is empty) and returns the JSON object it prints last."""
    environment = {**os.environ, **env}
    environment = {key: value for key, value in environment.items() if value}
    result = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


LOADED = (
    "import json, sys\n"
    "def loaded(*roots):\n"
    "    return sorted(m for m in sys.modules if m.split('.')[0] in roots)\n"
)


def imported_names(module: Path) -> list[str]:
    """The dotted names `module` imports, at its top or inside functions alike."""
    names = []
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def modules_of(package: str) -> list[str]:
    return sorted(
        ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for file in (ROOT / package).rglob("*.py")
    )


def test_layers_point_one_way():
    """`nnxtools` imports nothing of the project, `sharding` only it, `convert` nothing,
    `jaxfusion` all three: no cycle. Read from the source, so an import inside a function
    counts too."""
    found = {
        package: {
            name.split(".")[0]
            for file in (ROOT / package).rglob("*.py")
            for name in imported_names(file)
        }
        & {*PACKAGES} - {package}
        for package in PACKAGES
    }
    assert found == {
        "nnxtools": set(),
        "sharding": {"nnxtools"},
        "convert": set(),
        "jaxfusion": {"nnxtools", "sharding", "convert"},
    }


@pytest.mark.parametrize(
    "package, allowed", [("nnxtools", []), ("sharding", ["nnxtools"]), ("convert", [])]
)
def test_lower_layers_load_no_higher_package(package, allowed):
    """Every module of the package imported in a fresh interpreter loads no other package of
    the project but `allowed`."""
    others = [other for other in PACKAGES if other not in (package, *allowed)]
    code = "".join(f"import {module}\n" for module in modules_of(package))
    assert len(modules_of(package)) >= 3
    assert fresh_python(LOADED + code + f"print(json.dumps(loaded(*{others!r})))") == []


def test_bench_does_not_import_the_command_line():
    """Neither in its source (any import of `jaxfusion.cli`) nor when all of it is loaded."""
    modules = sorted(BENCH.glob("*.py"))
    assert {m.stem for m in modules} >= {"analyze", "evaluate", "options", "profile", "timing"}
    for module in modules:
        names = imported_names(module)
        assert not any(n.startswith("jaxfusion.cli") for n in names), (module, names)
    imports = "".join(f"import jaxfusion.bench.{m.stem}\n" for m in modules)
    found = fresh_python(LOADED + imports + "print(json.dumps(loaded('jaxfusion')))")
    assert "jaxfusion.bench.timing" in found and "jaxfusion.cli" not in found


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["generate", "--help"],
        ["bench", "analyze", "--help"],
        ["bench", "time", "--help"],
        ["profile", "--help"],
        ["eval", "--help"],
        ["train", "--help"],
    ],
)
def test_help_imports_no_jax(argv):
    """The command's help, as the console script runs it (`jaxfusion.cli:main`), answers
    without JAX, flax, numpy or torch: the choices it lists come from modules without them."""
    code = LOADED + (
        "from jaxfusion.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        f"print(json.dumps(dict(status=status, heavy=loaded(*{HEAVY!r}))))"
    )
    assert fresh_python(code) == {"status": 0, "heavy": []}


def test_help_lists_the_choices():
    result = subprocess.run(
        [Path(sys.executable).with_name("jaxfusion"), "generate", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    choices = [
        "{auto,xla,chunked,cudnn}",
        "{euler,ddim,dpmpp,euler_a,lcm,flow_match}",
        "{row,col,alternate}",
    ]
    choices += ["{single,sync,displaced,naive}", "{corrected,stale,separate,sync}"]
    for listed in choices:
        assert listed in result.stdout


def test_import_jaxfusion_is_cheap_until_used():
    """`import jaxfusion` (and the JAX-free leaves) load no JAX; a public name imports its
    module on first use, and `from jaxfusion import bench` still finds the subpackage."""
    code = LOADED + (
        "import jaxfusion, jaxfusion.models, jaxfusion.schedulers, sharding\n"
        "import jaxfusion.models.names, sharding.names, jaxfusion.bench.options\n"
        "before = loaded('jax', 'flax')\n"
        "config = jaxfusion.ParallelConfig(devices=2)\n"
        "from jaxfusion import bench\n"
        "print(json.dumps(dict(before=before, after=loaded('jax'), mode=config.mode,\n"
        "    names=[jaxfusion.load_pipeline.__module__, jaxfusion.UNetConfig.__module__,\n"
        "           bench.__name__, jaxfusion.models.AutoencoderKL.__module__,\n"
        "           jaxfusion.models.load_unet.__module__])))"
    )
    found = fresh_python(code)
    assert found["before"] == []
    assert "jax" in found["after"] and found["mode"] == "displaced"
    assert found["names"] == [
        "jaxfusion.pipelines",
        "jaxfusion.models.unet_2d_condition",
        "jaxfusion.bench",
        "jaxfusion.models.vae",
        "jaxfusion.models.pretrained",
    ]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = jaxfusion.nothing


def test_latency_hiding_flag_is_added_unless_set():
    flag = f"{LATENCY_HIDING_FLAG}=true"
    assert with_latency_hiding("") == flag
    assert with_latency_hiding("--xla_dump_to=/tmp/x") == f"--xla_dump_to=/tmp/x {flag}"
    for own in (f"{LATENCY_HIDING_FLAG}=false", LATENCY_HIDING_FLAG, f"-a {flag} --b"):
        assert with_latency_hiding(own) == own
    # A flag whose name only starts with this one's is another flag.
    assert with_latency_hiding(f"{LATENCY_HIDING_FLAG}_x=1") == f"{LATENCY_HIDING_FLAG}_x=1 {flag}"


@pytest.mark.parametrize(
    "user, expected",
    [
        ("", f"{LATENCY_HIDING_FLAG}=true"),
        (
            "--xla_force_host_platform_device_count=8",
            f"--xla_force_host_platform_device_count=8 {LATENCY_HIDING_FLAG}=true",
        ),
        (f"{LATENCY_HIDING_FLAG}=false", f"{LATENCY_HIDING_FLAG}=false"),
    ],
)
@pytest.mark.parametrize("package", ["sharding", "jaxfusion"])
def test_xla_flags_on_import(package, user, expected):
    """In a fresh interpreter, importing either package sets XLA_FLAGS as JAX will read it."""
    code = f"import json, os, {package}\nprint(json.dumps(os.environ['XLA_FLAGS']))"
    assert fresh_python(code, XLA_FLAGS=user) == expected
