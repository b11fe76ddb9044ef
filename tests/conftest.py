import importlib
import os
import sys

# One thread per process, this one and every process a test starts (set before torch is
# imported; children inherit it). The tests' models are small: a second thread buys little,
# and on a machine whose cores are busy with other work it costs a lot, because the threads
# of one op wait for each other (test_seed's trained micro teacher: 3 s on one thread, 29 s
# on two, with the two cores shared with one other busy process).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# the scripts are flat files at the repository root: make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU (CI) the Triton kernels run in Triton's CPU interpreter. Triton reads the
# variable when it is imported and when @triton.jit decorates a function, so it is set here,
# before any test module imports triton, scan_kernel or fused_decode. With CUDA it is left
# alone: the interpreter tests skip and the GPU tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def patch_triton_language_once_per_launch():
    """Triton's interpreter swaps triton.language's functions for interpreted ones when a
    kernel launches, and undoes it when the launch ends. It does the same swap again at every
    call of a @triton.jit helper inside the kernel (walking the modules with inspect), and
    that repeat is 40% of the fused decoder's tests and 17% of the scan kernels' (cProfile).
    Inside a launch that has already swapped the same modules the repeat changes nothing (the
    functions it would swap are swapped; the rest it sets to what is set), so it is skipped
    there. Nothing else changes: every kernel and helper runs as before. Should Triton's
    internals differ from these, nothing is patched (only slower)."""
    try:
        from triton.runtime import interpreter as ti
        import triton.language as tl
    except ImportError:
        return
    swap, launch = getattr(ti, "_patch_lang", None), getattr(ti.GridExecutor, "__call__", None)
    if swap is None or launch is None or not hasattr(ti, "_LangPatchScope"):
        return
    swapped = []                                    # per launch running now: modules swapped

    def modules(fn):
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def swap_once(fn):
        if swapped and modules(fn) <= swapped[-1]:
            return ti._LangPatchScope()             # nothing to undo: nothing was changed
        scope = swap(fn)
        if swapped:
            swapped[-1] |= modules(fn)
        return scope

    def launch_tracked(self, *args, **kwargs):
        swapped.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            swapped.pop()

    ti._patch_lang, ti.GridExecutor.__call__ = swap_once, launch_tracked


if os.environ.get("TRITON_INTERPRET") == "1":
    patch_triton_language_once_per_launch()


@pytest.fixture
def command(monkeypatch, capfd):
    """command(name, *argv) runs `python {name}.py argv` in this process, as the script's
    __main__ block runs it: its main() under util.run_cli. Output is captured at the file
    descriptors, so whatever a library writes to them is seen too. -> (exit code, stdout,
    stderr). Saves the 2-3 s of starting Python and importing torch per run; the tests about
    the process itself (its __main__ block, raw bytes in argv, signals, torchrun) start a
    real one."""
    def run(name, *argv):
        main = importlib.import_module(name).main
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, argv)])
        capfd.readouterr()
        code = 0
        try:
            importlib.import_module("util").run_cli(main)
        except SystemExit as e:
            code = e.code or 0
        out, err = capfd.readouterr()
        return code, out, err
    return run
