"""qforge: a Python client of the qforge quantization service (GPTQ, VPTQ).

    import qforge
    client = qforge.Client()                  # endpoint/token as the `qforge` CLI resolves them
    job = client.submit("file:///models/llama", output="file:///models/llama-gptq",
                        calibration="file:///data/calib.safetensors", bits=4, group_size=128)
    for event in client.watch(job.id):
        print(qforge.format_event(event))
    job = client.wait(job.id, timeout=3600)   # raises JobFailed, JobCancelled, Timeout, ...

Messages are the API's protobuf resources (`qforge.v1.job_service_pb2.Job`, ...), generated
from proto/qforge/v1 at build time by python/gen_stubs.py.
"""
# The generated stubs (qforge/v1) may sit in another directory than these sources (the build
# tree's python/ next to the repository's python/ on PYTHONPATH); extend_path joins them.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"

from .config import ClientConfig, default_config_path, resolve_config  # noqa: E402
from .errors import (  # noqa: E402
    InvalidArgument,
    JobCancelled,
    JobFailed,
    NotFound,
    PermissionDenied,
    QforgeError,
    QualityGateFailed,
    Timeout,
    Unavailable,
)
from .client import Client, Layer, format_event, is_terminal, state_name  # noqa: E402

__all__ = [
    "Client", "ClientConfig", "Layer", "default_config_path", "resolve_config", "format_event",
    "is_terminal", "state_name", "QforgeError", "Unavailable", "InvalidArgument", "NotFound",
    "PermissionDenied", "Timeout", "JobFailed", "QualityGateFailed", "JobCancelled",
]
