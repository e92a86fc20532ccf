"""The Python API is as quiet as the command: loading a pipeline on a machine without
PyTorch does not print transformers' notice that PyTorch was not found (the command silences
it with environment variables; the library must not change the user's environment), and
transformers' logging is left as the user had it."""

import subprocess
import sys

# PyTorch hidden from this interpreter, as on a machine with `pip install jaxfusion` alone.
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None\n"
NOTICE = "PyTorch was not found"


def run(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH + code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return result


def test_transformers_prints_the_notice_without_torch():
    """The control: without jaxfusion in between, transformers prints it here."""
    assert NOTICE in run("import transformers").stderr


def test_load_pipeline_does_not_print_it_and_leaves_logging_alone():
    result = run(
        "import logging, os\n"
        "import jaxfusion\n"
        "pipe = jaxfusion.load_pipeline(abstract=True)\n"
        "assert pipe.tokenizers, 'tokenizers loaded'\n"
        "print(sorted(k for k in os.environ if 'TRANSFORMERS' in k))\n"
        "print(logging.getLogger('transformers').filters)\n"
        "from transformers.utils import logging as hf_logging\n"
        "hf_logging.get_logger('transformers').warning('a warning of the user')\n"
    )
    assert NOTICE not in result.stderr, result.stderr
    assert result.stdout.splitlines() == ["[]", "[]"]
    assert "a warning of the user" in result.stderr  # transformers still logs
