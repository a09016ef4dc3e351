"""Shared test helpers: an expected Python exception, never a Rust panic; the sampler settings
that shape the sampling path."""

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """A repository script that is not part of the package (bench/*.py, .ci/stubgen.py),
    imported from its file."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The UnifiedSampler settings saved with a model (every one but the execution switches
# use_fused_kernel and check_finite), in the order of the settings table.
PATH_SETTINGS = (
    "sampling_steps",
    "stochast_ratio",
    "extrapol_ratio",
    "sampling_order",
    "time_dist_ctrl",
    "rfba_gap_steps",
    "sampling_style",
)


def _is_panic(e: BaseException) -> bool:
    t = type(e)
    return t.__name__ == "PanicException" or (t.__module__ or "").startswith("pyo3_runtime")


def expect_error(exc_types, fn, *, contains=()):
    """Call fn, require an exception of exc_types (never a panic) whose message contains each string
    (a tuple entry that is itself a tuple means "any of these"). Returns the exception."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - PanicException derives from BaseException
        assert not _is_panic(e), f"Rust panic leaked to Python: {type(e)!r}: {e}"
        if not isinstance(e, exc_types):
            raise AssertionError(f"expected {exc_types}, got {type(e).__name__}: {e}") from e
        msg = str(e)
        for c in ([contains] if isinstance(contains, str) else contains):
            alts = c if isinstance(c, tuple) else (c,)
            assert any(a in msg for a in alts), f"message {msg!r} does not mention {alts}"
        return e
    raise AssertionError(f"no exception raised (expected {exc_types})")
