#!/usr/bin/env python3
"""Refuses a back-edge between the project's floors.

Every `#include "..."` of a project file (C++, CUDA) must point to a folder its own folder may
depend on. The floors, each allowed to use only those listed (and itself):

    base    -> (nothing)
    quant   -> base                          (quant/cuda/ is part of quant)
    common  -> base
    job     -> common, quant, base, proto    (but from quant/cuda only memory_estimates.h)
    server  -> job, common, quant, base, proto  (same quant/cuda rule: no CUDA runtime)
    worker  -> job, common, quant, base, proto
    client  -> proto                         (and from common only tls.h: TLS credentials)
    tools   -> job, common, quant, base, proto
    bench   -> job, common, quant, base      (job/ only in the modes compiled into full builds:
                                              --mode evaluate, bench/evaluate_mode.cc; worker
                                              and proto only in the service load benchmark,
                                              bench/service_load.cc)
    fuzz    -> job, common, quant, base, proto   (libFuzzer targets of the parsers)
    tests   -> anything

"proto" is the generated `qforge/v1/*.pb.h`. Includes in <...> (system and third-party
headers) and third-party headers in quotes are not checked, except that base/ and quant/ may
not include abseil, gRPC, protobuf, nlohmann, CLI11 or prometheus headers (they build with only a compiler, CUDA and an optional BLAS).

Usage: check_layering.py REPO_ROOT   (exit 0: clean; 1: violations, one line each).
       check_layering.py --self-test   (plants each kind of violation in a temporary tree and
                                        fails unless every one is reported).
       check_layering.py --no-cuda-libraries BINARY   (fails when the ELF binary needs a CUDA
                                        runtime, cuBLAS or cuSOLVER library, per readelf -d).
"""
import os
import re
import sys

ALLOWED = {
    "base": set(),
    "quant": {"base"},
    "common": {"base"},
    "job": {"common", "quant", "base", "proto"},
    "server": {"job", "common", "quant", "base", "proto"},
    "worker": {"job", "common", "quant", "base", "proto"},
    "client": {"proto"},
    "tools": {"job", "common", "quant", "base", "proto"},
    "bench": {"job", "common", "quant", "base", "worker", "proto"},
    "fuzz": {"job", "common", "quant", "base", "proto"},
}
# Folders that must not reach the CUDA backends (only their memory estimates).
NO_CUDA_RUNTIME = {"job", "server"}
CUDA_ALLOWED_HEADER = "quant/cuda/memory_estimates.h"
# The CLI's one header below proto: the TLS credentials it shares with the services.
CLIENT_ALLOWED_HEADERS = {"common/tls.h"}
# Floors that build without any Debian dev package.
DEPENDENCY_FREE = {"base", "quant"}
FORBIDDEN_SYSTEM = re.compile(r"^(absl|grpc|grpcpp|google|nlohmann|prometheus|CLI|sqlite3|openssl|curl)\b")
SOURCE = re.compile(r"\.(cc|h|cu|cuh)$")
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')


def floor_of_include(path):
    if path.startswith("qforge/v1/"):
        return "proto"
    head = path.split("/", 1)[0]
    return head if head in ALLOWED else None


def check(root):
    problems = []
    for floor in ALLOWED:
        top = os.path.join(root, floor)
        for dirpath, _, files in os.walk(top):
            for name in sorted(files):
                if not SOURCE.search(name):
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                with open(full, encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        m = INCLUDE.match(line)
                        if not m:
                            continue
                        kind, target = m.groups()
                        where = f"{rel}:{lineno}"
                        dep = floor_of_include(target) if kind == '"' else None
                        if dep is None:
                            if floor in DEPENDENCY_FREE and FORBIDDEN_SYSTEM.match(target):
                                problems.append(f"{where}: {floor}/ must build without dev "
                                                f"packages but includes {target}")
                            continue
                        if dep == floor:
                            continue
                        if floor == "client" and target in CLIENT_ALLOWED_HEADERS:
                            continue
                        if dep not in ALLOWED[floor]:
                            problems.append(f"{where}: {floor}/ may not include \"{target}\" "
                                            f"({floor} -> {dep} is a back-edge or a skipped floor; "
                                            f"allowed: {', '.join(sorted(ALLOWED[floor])) or 'none'})")
                        elif (floor in NO_CUDA_RUNTIME and target.startswith("quant/cuda/")
                              and target != CUDA_ALLOWED_HEADER):
                            problems.append(f"{where}: {floor}/ may not include \"{target}\" "
                                            f"(the coordinator's side never links the CUDA "
                                            f"backends; use {CUDA_ALLOWED_HEADER})")
    return problems


def self_test():
    import tempfile
    planted = {
        "quant/gptq.cc": '#include "common/object_store.h"\n',      # quant -> common
        "common/uri.cc": '#include "job/spec.h"\n',                  # back-edge
        "job/spec.cc": '#include "server/job_manager.h"\n',          # back-edge
        "server/planner.cc": '#include "quant/cuda/backends.h"\n',   # CUDA runtime
        "client/main.cc": '#include "common/uri.h"\n',               # client -> proto only
        "worker/task.cc": '#include "server/spec.h"\n',             # sideways
        "base/status.h": '#include "absl/status/status.h"\n',      # not dependency-free
    }
    clean = {
        "server/a.cc": '#include "quant/cuda/memory_estimates.h"\n#include "job/spec.h"\n',
        "worker/b.cc": '#include "quant/cuda/backends.h"\n#include <absl/strings/str_cat.h>\n',
        "tools/c.cc": '#include "job/layer_runner.h"\n',
        "bench/d.cc": '#include "job/evaluation.h"\n',
    }
    with tempfile.TemporaryDirectory() as root:
        for rel, text in list(planted.items()) + list(clean.items()):
            os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
            with open(os.path.join(root, rel), "w") as f:
                f.write(text)
        found = check(root)
    missing = [rel for rel in planted if not any(p.startswith(rel + ":") for p in found)]
    extra = [p for p in found if p.split(":", 1)[0] in clean]
    for rel in missing:
        print(f"self-test: the violation planted in {rel} was not reported")
    for p in extra:
        print(f"self-test: a clean include was reported: {p}")
    if missing or extra:
        return 1
    print(f"self-test: all {len(planted)} planted violations reported, no clean include flagged")
    return 0


def check_no_cuda_libraries(binary):
    import subprocess
    out = subprocess.run(["readelf", "-d", binary], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"readelf -d {binary} failed: {out.stderr.strip()}")
        return 1
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out.stdout)
    if not needed:
        print(f"{binary}: readelf lists no NEEDED library; cannot check")
        return 1
    cuda = [lib for lib in needed if re.match(r"lib(cudart|cublas|cublasLt|cusolver|cuda)\b", lib)]
    if cuda:
        print(f"{binary} needs {', '.join(cuda)}: the coordinator must not link the CUDA backends")
        return 1
    print(f"{binary}: {len(needed)} libraries needed, none of them CUDA's")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    if len(sys.argv) == 3 and sys.argv[1] == "--no-cuda-libraries":
        return check_no_cuda_libraries(sys.argv[2])
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    problems = check(sys.argv[1])
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} include(s) break the layering (tests/layering/check_layering.py)")
        return 1
    print("layering: every include points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
