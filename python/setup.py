"""`pip install ./python` (offline; add --no-build-isolation where pip would fetch setuptools):
the `qforge` package with its gRPC stubs generated at build time from ../proto by
gen_stubs.py (protoc and grpc_python_plugin from Debian's protobuf-compiler-grpc). Runtime
dependencies: Debian's python3-grpcio and python3-protobuf (not pulled from an index)."""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_stubs  # noqa: E402


class BuildPyWithStubs(build_py):
    """build_py, then the stubs into build_lib/qforge/v1."""

    def run(self):
        super().run()
        proto_dir = os.environ.get("QFORGE_PROTO_DIR", gen_stubs.DEFAULT_PROTO_DIR)
        try:
            gen_stubs.generate(self.build_lib, proto_dir)
        except gen_stubs.GenerationError as e:
            raise SystemExit(f"qforge: cannot generate the gRPC stubs: {e}")


setup(
    name="qforge",
    version="0.1.0",
    description="Python client of the qforge quantization service (GPTQ, VPTQ)",
    packages=["qforge"],
    python_requires=">=3.9",
    # grpcio and protobuf come from Debian (python3-grpcio, python3-protobuf); declaring them
    # here would make pip look for them on an index.
    install_requires=[],
    cmdclass={"build_py": BuildPyWithStubs},
)
