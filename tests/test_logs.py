"""bibo_export.logs hides the known harmless noise and nothing else. Runs in both virtualenvs, so
it imports neither torch, torchao nor executorch: the messages are replayed by hand."""

import logging
import os
import select
import subprocess
import sys
import warnings
from pathlib import Path

from bibo_export.logs import silence_known_noise

ROOT = Path(__file__).resolve().parents[1]
CPUINFO_LINE = b"[cpuinfo_utils.cpp:87] Failed to open midr file /sys/devices/soc0/image_version\n"
GSPMD_LINE = (b"2026-11-27 23:49:17.670312: W external/xla/xla/service/sharding_propagation.cc:"
              b"3120] GSPMD sharding propagation is going to be deprecated and not supported in "
              b"the future. Please consider migrating to Shardy (https://openxla.org/shardy).\n")
THREADPOOL_LINE = b"[threadpool.cpp:66] Resetting threadpool to 1 threads.\n"
RUNNER_SHORT_LINE = b"[llm_runner_helper.cpp:137] Metadata: use_kv_cache = 1\n"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=60)


def test_known_warning_is_dropped_and_other_warnings_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_noise()
        installed = len(warnings.filters)
        silence_known_noise()
        assert len(warnings.filters) == installed
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, "
                      "TreeSpec) and treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("some other deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["some other deprecation"]


def test_known_torchao_record_is_dropped_and_others_kept(caplog):
    silence_known_noise()
    installed = len(logging.getLogger("torchao").filters)
    silence_known_noise()
    assert len(logging.getLogger("torchao").filters) == installed
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logging.getLogger("torchao").warning(
            "Failed to load /env/lib/python3.11/site-packages/torchao/_C_mxfp8.so: Could not load "
            "this library: /env/lib/python3.11/site-packages/torchao/_C_mxfp8.so")
        logging.getLogger("torchao").warning("Failed to load the weights")
    assert [r.getMessage() for r in caplog.records] == ["Failed to load the weights"]


def test_known_pytree_record_is_dropped_and_others_kept():
    # Once torch is imported its "torch" logger stops propagating, so caplog would see nothing:
    # ask the logger's filters directly, as Logger.handle does.
    silence_known_noise()
    logger = logging.getLogger("torch.utils._pytree")
    message = ("%s is an Enum subclass and is now natively supported by torch.compile as an "
               "opaque value type.")

    def kept(enum: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, "_pytree.py",
                                                    630, message, (enum,), None)))

    assert not kept("<enum 'KernelPreference'>")
    assert kept("<enum 'Colour'>")


def test_known_torchvision_record_is_dropped_and_others_kept():
    silence_known_noise()
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")

    def kept(message: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING,
                                                    "_registration.py", 107, message, (), None)))

    assert not kept("torchvision is not installed. Skipping torchvision::roi_align")
    assert kept("Skipping the translation of aten::foo")


# Records as libraries log them: chatter at INFO, a warning and an error, and a warning from a
# library that gave its logger a NullHandler so as to stay quiet.
LOG_RECORDS = """
logging.getLogger("lib").info("chatter")
logging.getLogger("lib").warning("a warning")
logging.getLogger("quiet").addHandler(logging.NullHandler())
logging.getLogger("quiet").warning("not for the user")
logging.getLogger("lib").error("an error")
"""


def test_a_library_configuring_logging_on_import_changes_nothing_shown():
    """onnxruntime's quantizer calls logging.basicConfig(level=INFO) when imported. After
    silence_known_noise, what is shown is what Python shows with logging left alone."""
    plain = run_python("import logging\n" + LOG_RECORDS)
    configured = run_python(f"""
import logging
from bibo_export.logs import silence_known_noise
silence_known_noise()
silence_known_noise()
logging.basicConfig(format="%(name)s [%(levelname)s] - %(message)s", level=logging.INFO)
{LOG_RECORDS}""")
    assert plain.stderr == b"a warning\nan error\n", plain.stderr  # Python's own fallback
    assert configured.returncode == 0 and configured.stderr == plain.stderr, configured.stderr


def test_native_stderr_drops_known_lines_and_keeps_the_rest_in_order():
    result = run_python(f"""
import os, sys
from bibo_export.logs import filtered_native_stderr
with filtered_native_stderr():
    os.write(2, {CPUINFO_LINE!r})
    os.write(2, b"native: kept\\n")
    print("Traceback (most recent call last):", file=sys.stderr)
    os.write(2, b"x" * 300_000 + b"\\n")  # more than a pipe holds: must not block
    os.write(2, {CPUINFO_LINE!r})
    os.write(2, {GSPMD_LINE!r})
    os.write(2, {THREADPOOL_LINE!r})
    os.write(2, {RUNNER_SHORT_LINE!r})
    os.write(2, b"partial, no newline")
print(" / after the block", file=sys.stderr)
""")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (b"native: kept\nTraceback (most recent call last):\n"
                             + b"x" * 300_000 + b"\npartial, no newline / after the block\n")


def test_native_filter_shows_a_partial_line_while_the_program_runs():
    # A progress bar redraws its line without a newline: it must show before the block ends.
    proc = subprocess.Popen([sys.executable, "-c", """
import os, sys
from bibo_export.logs import filtered_native_stderr
with filtered_native_stderr():
    os.write(2, b"step 1/2")
    sys.stdin.readline()
"""], stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert select.select([proc.stderr], [], [], 30)[0], "nothing shown in 30 s"
        assert os.read(proc.stderr.fileno(), 100) == b"step 1/2"
    finally:
        proc.communicate(b"\n", timeout=60)


def test_native_filter_does_nothing_without_fd_2():
    result = run_python("""
import os
from bibo_export.logs import filtered_native_stderr
os.close(2)
with filtered_native_stderr():
    print("ran")
""")
    assert (result.returncode, result.stdout) == (0, b"ran\n")
