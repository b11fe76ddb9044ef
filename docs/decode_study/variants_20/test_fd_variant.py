"""tests/test_fused_decode.py over a variant file of fused_decode.py, its module constants set
from FLAGS ("A=1,B=0"). Copy it into tests/ first, under a name starting with test_ (it imports
tests/test_fused_decode.py), then run pytest on the copy with VARIANT=/tmp/fd_ss.py
FLAGS=SS_MODE=2 TRITON_INTERPRET=1 (on a GPU without the interpreter and with -k gpu)."""
import importlib.util
import os
import sys
sys.path[:0] = [".", "tests"]

spec = importlib.util.spec_from_file_location("fused_decode", os.environ["VARIANT"])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
for item in filter(None, os.environ.get("FLAGS", "").split(",")):
    key, value = item.split("=")
    old = getattr(mod, key)
    setattr(mod, key, bool(int(value)) if isinstance(old, bool) else type(old)(value))
sys.modules["fused_decode"] = mod
import test_fused_decode  # noqa: E402
test_fused_decode.fd = mod
from test_fused_decode import *  # noqa: E402,F401,F403
