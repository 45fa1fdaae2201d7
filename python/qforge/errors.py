"""Typed errors of the qforge client.

Every error is a QforgeError carrying `message` and, where it came from an RPC, the gRPC
`code`; `exit_code` is the `qforge` CLI's exit code for the same outcome (docs/cli.md), so a
pipeline step can exit the way the CLI would.

    RPC status                                   error
    UNAVAILABLE, DEADLINE_EXCEEDED               Unavailable
    INVALID_ARGUMENT, FAILED_PRECONDITION,       InvalidArgument (.field: "spec.gptq.bits")
      OUT_OF_RANGE, ALREADY_EXISTS
    NOT_FOUND                                    NotFound
    UNAUTHENTICATED, PERMISSION_DENIED           PermissionDenied
    anything else                                QforgeError

    job outcome (Client.wait)                    error
    FAILED                                       JobFailed (.reason, .subject, .job)
    FAILED with reason QUALITY_GATE              QualityGateFailed (a JobFailed)
    CANCELLED                                    JobCancelled
    still running at the timeout                 Timeout
"""
import re

import grpc

# The coordinator's INVALID_ARGUMENT messages start with the offending field:
# "spec.gptq.bits: must be 2, 3, 4 or 8".
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class QforgeError(Exception):
    """Base class. `code`: the grpc.StatusCode (None for client-side checks)."""

    exit_code = 1

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        self.code = code


class Unavailable(QforgeError):
    """The coordinator could not be reached (or did not answer within the deadline)."""

    exit_code = 3


class InvalidArgument(QforgeError, ValueError):
    """A rejected request. `field` names the offending field ("spec.gptq.bits", or a keyword
    argument of Client.submit for client-side checks); "" when the message names none."""

    exit_code = 7

    def __init__(self, message, code=None, field=None):
        super().__init__(message, code)
        if field is None:
            m = _FIELD_PREFIX.match(message)
            field = m.group(1) if m else ""
        self.field = field


class NotFound(QforgeError, LookupError):
    """No such job (or not visible to this tenant)."""

    exit_code = 4


class PermissionDenied(QforgeError, PermissionError):
    """A missing or wrong token (UNAUTHENTICATED), or an operation the tenant may not do."""

    exit_code = 6


class Timeout(QforgeError, TimeoutError):
    """Client.wait's timeout passed with the job still running. `job`: the job as last seen."""

    exit_code = 1

    def __init__(self, message, job=None):
        super().__init__(message)
        self.job = job


class JobFailed(QforgeError):
    """The job ended FAILED. `reason` (e.g. "HESSIAN_MISSING", "QUALITY_GATE") and `subject`
    (the offending tensor, field or file) come from Job.error; `job` is the final resource."""

    exit_code = 1

    def __init__(self, job):
        err = job.error
        self.job = job
        self.reason = err.reason
        self.subject = err.subject
        text = f"job {job.id} failed"
        if err.reason:
            text += f" ({err.reason})"
        if err.message:
            text += f": {err.message}"
        if err.subject and err.subject not in (err.message or ""):
            text += f" [{err.subject}]"
        super().__init__(text)
        self.error_code = err.code  # the canonical code of Job.error (google.rpc.Code)


class QualityGateFailed(JobFailed):
    """The job's evaluation missed its quality gate (reason QUALITY_GATE): the artifact stays
    at the output, its manifest marked "quality_gate": "failed"; `job.quality` holds the
    measured values."""


class JobCancelled(QforgeError):
    """The job ended CANCELLED. `job`: the final resource."""

    exit_code = 5

    def __init__(self, job):
        super().__init__(f"job {job.id} was cancelled")
        self.job = job


def job_error(job):
    """The error for a FAILED job (QualityGateFailed when the gate was missed)."""
    if job.error.reason == "QUALITY_GATE":
        return QualityGateFailed(job)
    return JobFailed(job)


def from_rpc_error(e, what=""):
    """Maps a grpc.RpcError to the typed error; `what` ("get 1234") prefixes the message."""
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    message = f"{what}: {details}" if what else details
    C = grpc.StatusCode
    if code in (C.UNAVAILABLE, C.DEADLINE_EXCEEDED):
        return Unavailable(message, code)
    if code in (C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.OUT_OF_RANGE, C.ALREADY_EXISTS):
        m = _FIELD_PREFIX.match(details)
        return InvalidArgument(message, code, field=m.group(1) if m else "")
    if code == C.NOT_FOUND:
        return NotFound(message, code)
    if code in (C.UNAUTHENTICATED, C.PERMISSION_DENIED):
        return PermissionDenied(message, code)
    return QforgeError(message, code)
