"""qforge.Client: the JobService API of a qforge coordinator, typed.

Thread-safety: a Client may be shared by threads (gRPC channels and stubs are thread-safe);
each watch() iterator belongs to the thread iterating it.
"""
import dataclasses
import os
import time
import uuid

import grpc

from . import errors
from .config import resolve_config
from .errors import InvalidArgument, Timeout, Unavailable
from .v1 import common_pb2, job_service_pb2, job_service_pb2_grpc

_TERMINAL = (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
             common_pb2.JOB_STATE_CANCELLED)
_ACTIVE = (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_CALIBRATING,
           common_pb2.JOB_STATE_QUANTIZING, common_pb2.JOB_STATE_ASSEMBLING,
           common_pb2.JOB_STATE_EVALUATING, common_pb2.JOB_STATE_CANCELLING)
# Codes after which a watch stream is resumed (a dropped or restarting server).
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED)

_GPTQ_OPTIONS = ("bits", "group_size", "asym", "desc_act", "static_groups", "mse",
                 "checkpoint_format")
_VPTQ_OPTIONS = ("vector_len", "centroids", "res_centroids", "outlier_size",
                 "outlier_vector_len", "outlier_centroids", "group_num", "no_norm", "no_perm",
                 "kmeans_iters", "seed")
_CALIB_OPTIONS = ("calib_samples", "calib_seq_len", "calib_shard_samples", "no_cache")
_EVAL_OPTIONS = ("eval_samples", "eval_seq_len", "eval_shard_samples", "max_ppl_increase",
                 "max_kld", "eval_allow_calibration_data")


def is_terminal(state):
    """SUCCEEDED, FAILED or CANCELLED."""
    return state in _TERMINAL


def state_name(state):
    """JOB_STATE_QUANTIZING -> "QUANTIZING" (job states; task states likewise)."""
    try:
        return common_pb2.JobState.Name(state)[len("JOB_STATE_"):]
    except ValueError:
        return "UNKNOWN"


def _task_state_name(state):
    try:
        return common_pb2.TaskState.Name(state)[len("TASK_STATE_"):]
    except ValueError:
        return "UNKNOWN"


def _task_kind_name(kind):
    try:
        return common_pb2.TaskKind.Name(kind)[len("TASK_KIND_"):]
    except ValueError:
        return "UNKNOWN"


def count_summary(tasks):
    """What the counts count, as the CLI prints them: "12/28 layers + assemble, 2 running"
    (QUANTIZE tasks succeeded / planned, then the stage tasks: "+ assemble", or "+ 5 stage
    tasks" with calibration or evaluation); "1/3 tasks" for a job without layers."""
    if tasks.layers > 0:
        text = f"{tasks.layers_succeeded}/{tasks.layers} layer{'s' if tasks.layers != 1 else ''}"
        stage = tasks.total - tasks.layers
        if stage == 1:
            text += " + assemble"
        elif stage > 1:
            text += f" + {stage} stage tasks"
    else:
        text = f"{tasks.succeeded}/{tasks.total} task{'s' if tasks.total != 1 else ''}"
    if tasks.running:
        text += f", {tasks.running} running"
    if tasks.failed:
        text += f", {tasks.failed} failed"
    if tasks.retries:
        text += f", {tasks.retries} {'retry' if tasks.retries == 1 else 'retries'}"
    return text


def format_event(e):
    """One log line per event, e.g.
    "12:00:01 QUANTIZING 3/30 tasks, 2 running | QUANTIZE model.layers.0.mlp.down_proj
    SUCCEEDED attempt 1 on w-1 in 1.23 s (rel err 1.2e-03)"."""
    t = time.strftime("%H:%M:%S", time.localtime(e.time_unix_ms / 1000)) if e.time_unix_ms else "--:--:--"
    line = f"{t} {state_name(e.job_state)} {count_summary(e.tasks)}"
    if e.type == job_service_pb2.EVENT_TYPE_PROGRESS:
        parts = [f"{r.module or r.subject} {r.progress:.0%}" + (f" {r.phase}" if r.phase else "")
                 + f" {r.elapsed_seconds:.1f}s" for r in e.running]
        return line + " | progress: " + (", ".join(parts) or "-")
    if e.HasField("task"):
        k = e.task
        what = k.layer or k.task_id
        line += f" | {_task_kind_name(k.kind)} {what} {_task_state_name(k.state)}"
        line += f" attempt {k.attempt + 1}"
        if k.worker_id:
            line += f" on {k.worker_id}"
        if k.seconds:
            line += f" in {k.seconds:.2f} s"
        if k.relative_error:
            line += f" (rel err {k.relative_error:.1e})"
        if k.HasField("error") and k.error.message:
            line += f": {k.error.reason or 'error'}: {k.error.message}"
    if e.message:
        line += f" | {e.message}"
    return line


@dataclasses.dataclass
class Layer:
    """One quantized linear module's latest result (Client.layers)."""
    name: str                       # "model.layers.0.mlp.down_proj"
    state: str                      # "SUCCEEDED", "RUNNING", "FAILED", ...
    attempt: int = 0                # 1 = the first attempt
    worker_id: str = ""
    proxy_loss: float = 0.0
    relative_error: float = 0.0     # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)
    seconds: float = 0.0
    bits_per_weight: float = None   # codes + scales + zeros (+ g_idx) / indices + codebooks
    out_features: int = 0
    in_features: int = 0
    backend: str = ""               # "cpu" | "cuda" once it succeeded
    progress: float = 0.0           # RUNNING: the last heartbeat's fraction
    phase: str = ""                 # RUNNING: "read", "solve", "write", ...
    error_reason: str = ""
    error_message: str = ""


def _absolutize(uri):
    """A local path becomes absolute (the coordinator reads what the caller meant); URIs with
    a scheme ("file://", "s3://") are kept (the CLI's AbsolutizeLocalUri)."""
    if not uri or "://" in uri or uri.startswith("/"):
        return uri
    return os.path.normpath(os.path.abspath(uri))


class Client:
    """A connection to a qforge coordinator.

    endpoint, token: None = resolved as the CLI resolves them (qforge.config). timeout: the
    deadline of each unary call, seconds. environ/config_path: for tests (default os.environ
    and the CLI's config file). Every method raises the typed errors of qforge.errors.
    """

    def __init__(self, endpoint=None, token=None, *, timeout=30.0, environ=None,
                 config_path=None, tls_ca=None, tls_cert=None, tls_key=None):
        self.config = resolve_config(endpoint, token, environ, config_path, tls_ca=tls_ca,
                                     tls_cert=tls_cert, tls_key=tls_key)
        self.endpoint = self.config.endpoint
        self.timeout = timeout
        self._metadata = ((("authorization", "Bearer " + self.config.token),)
                          if self.config.token else ())
        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        c = self.config
        if c.tls_ca or c.tls_cert or c.tls_key:
            self._channel = grpc.secure_channel(self.endpoint, _tls_credentials(c), options)
        else:
            self._channel = grpc.insecure_channel(self.endpoint, options=options)
        self._stub = job_service_pb2_grpc.JobServiceStub(self._channel)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, what, rpc, request):
        try:
            return rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            err = errors.from_rpc_error(e, what)
            if isinstance(err, Unavailable):
                err.message += f" (is a qforge-coordinator running at {self.endpoint}?)"
                err.args = (err.message,)
            raise err from None

    # ---- submit ----------------------------------------------------------------------------

    def submit(self, model, *, output, method="gptq", calibration=None, hessians=None,
               calib_samples=None, calib_seq_len=None, calib_shard_samples=None, no_cache=None,
               damp=0.0,
               bits=None, group_size=None, asym=None, desc_act=None, static_groups=None,
               mse=None, checkpoint_format=None,
               vector_len=None, centroids=None, res_centroids=None, outlier_size=None,
               outlier_vector_len=None, outlier_centroids=None, group_num=None, no_norm=None,
               no_perm=None, kmeans_iters=None, seed=None,
               eval_data=None, eval_samples=None, eval_seq_len=None, eval_shard_samples=None,
               max_ppl_increase=None, max_kld=None, eval_allow_calibration_data=None,
               include=(), exclude=(), priority=0, max_attempts=0, max_shard_bytes=0,
               labels=None, request_id=None, validate_only=False):
        """Submits a quantization job (the options of `qforge submit`, as keywords) and returns
        the Job (QUEUED; with validate_only, the plan without creating a job).

        model, output: directory URIs (a path, file:///dir, s3://bucket/prefix); output must
        be empty. method: "gptq" or "vptq". Exactly one of calibration (token data URI, or
        "none" for data-free) and hessians (a Hessian safetensors URI).
        GPTQ: bits (4), group_size (128; -1 per channel), asym, desc_act, static_groups, mse,
        checkpoint_format ("gptq" or "gptq_v2"). VPTQ (unset: the server's defaults, v8,
        65536 centroids): vector_len, centroids, res_centroids, outlier_size,
        outlier_vector_len, outlier_centroids, group_num, no_norm, no_perm, kmeans_iters, seed.
        Both: damp. Evaluation: eval_data plus eval_samples, eval_seq_len, eval_shard_samples,
        max_ppl_increase (%), max_kld, eval_allow_calibration_data. request_id: idempotency key
        (default: a fresh UUID, kept in the returned Job).
        A method's option with the other method, or a calibration/evaluation option without
        its data, raises InvalidArgument naming the keyword (nothing is sent).
        """
        given = {k: v for k, v in locals().items() if v is not None}
        if method not in ("gptq", "vptq"):
            raise InvalidArgument(f'method must be "gptq" or "vptq", not {method!r}', field="method")
        vptq = method == "vptq"
        for name in (_GPTQ_OPTIONS if vptq else _VPTQ_OPTIONS):
            if name in given:
                raise InvalidArgument(
                    f"{name} is a {'GPTQ' if vptq else 'VPTQ'} option; the method is {method}"
                    + ("" if vptq else ' (pass method="vptq")'), field=name)
        if (calibration is None) == (hessians is None):
            raise InvalidArgument(
                "give exactly one of calibration=DATA (token ids: safetensors input_ids or JSON "
                'Lines), hessians=URI or calibration="none"', field="calibration")
        from_data = calibration is not None and calibration != "none"
        for name in _CALIB_OPTIONS:
            if name in given and not from_data:
                raise InvalidArgument(f"{name} applies to calibration from token data only "
                                      "(calibration=DATA)", field=name)
        for name in _EVAL_OPTIONS:
            if name in given and not eval_data:
                raise InvalidArgument(f"{name} needs eval_data=DATA", field=name)

        req = job_service_pb2.SubmitJobRequest()
        spec = req.spec
        spec.model_uri = _absolutize(model)
        spec.output_uri = _absolutize(output)
        spec.method = common_pb2.METHOD_VPTQ if vptq else common_pb2.METHOD_GPTQ
        if vptq:
            v = spec.vptq
            v.vector_len = vector_len or 0
            v.num_centroids = centroids or 0
            v.num_res_centroids = res_centroids or 0
            v.outlier_size = outlier_size or 0
            v.outlier_vector_len = outlier_vector_len or 0
            v.outlier_centroids = outlier_centroids or 0
            v.group_num = group_num or 0
            if no_norm:
                v.enable_norm = False
            if no_perm:
                v.enable_perm = False
            v.kmeans_iters = kmeans_iters or 0
            v.seed = seed or 0
            v.damp_percent = damp
        else:
            g = spec.gptq
            g.bits = 4 if bits is None else bits
            g.group_size = 128 if group_size is None else group_size
            g.asym = bool(asym)
            g.desc_act = bool(desc_act)
            g.static_groups = bool(static_groups)
            g.mse = bool(mse)
            g.damp_percent = damp
            g.checkpoint_format = checkpoint_format or "gptq"
        c = spec.calibration
        if hessians is not None:
            c.hessians_uri = _absolutize(hessians)
        elif calibration == "none":
            c.none = True
        else:
            c.dataset_uri = _absolutize(calibration)
            c.samples = calib_samples or 0
            c.seq_len = calib_seq_len or 0
            c.shard_samples = calib_shard_samples or 0
            c.no_cache = bool(no_cache)
        if eval_data:
            ev = spec.evaluation
            ev.dataset_uri = _absolutize(eval_data)
            ev.samples = eval_samples or 0
            ev.seq_len = eval_seq_len or 0
            ev.shard_samples = eval_shard_samples or 0
            ev.allow_calibration_data = bool(eval_allow_calibration_data)
            if max_ppl_increase is not None:
                ev.max_ppl_increase_pct = max_ppl_increase
            if max_kld is not None:
                ev.max_kl = max_kld
        if isinstance(include, str):
            include = [include]
        if isinstance(exclude, str):
            exclude = [exclude]
        spec.include.extend(include)
        spec.exclude.extend(exclude)
        spec.priority = priority
        spec.max_attempts = max_attempts
        spec.max_shard_bytes = max_shard_bytes
        for k, v in (labels or {}).items():
            spec.labels[str(k)] = str(v)
        req.request_id = request_id or str(uuid.uuid4())
        req.validate_only = validate_only
        return self._call("validate" if validate_only else "submit", self._stub.SubmitJob, req)

    # ---- read ------------------------------------------------------------------------------

    def get(self, job_id):
        """The Job resource."""
        return self._call(f"get {job_id}", self._stub.GetJob, job_service_pb2.GetJobRequest(id=job_id))

    def list(self, states=None, page_size=None, limit=None):
        """Jobs of this tenant, newest first, every page (at most `limit`). states: job states
        to keep: JobState values or names ("queued", "QUANTIZING", "JOB_STATE_FAILED") or
        "active" (every non-terminal state); None = all."""
        wanted = []
        for s in ([states] if isinstance(states, (str, int)) else (states or [])):
            if isinstance(s, int):
                wanted.append(s)
                continue
            name = s.upper()
            if name == "ACTIVE":
                wanted.extend(_ACTIVE)
                continue
            if not name.startswith("JOB_STATE_"):
                name = "JOB_STATE_" + name
            try:
                wanted.append(common_pb2.JobState.Value(name))
            except ValueError:
                raise InvalidArgument(f"{s!r} is not a job state", field="states") from None
        jobs, token = [], ""
        while True:
            req = job_service_pb2.ListJobsRequest(page_size=page_size or 0, page_token=token,
                                                  states=wanted)
            resp = self._call("list", self._stub.ListJobs, req)
            jobs.extend(resp.jobs)
            token = resp.next_page_token
            if not token or (limit is not None and len(jobs) >= limit):
                return jobs[:limit] if limit is not None else jobs

    def workers(self):
        """The registered workers (WorkerInfo)."""
        return list(self._call("workers", self._stub.ListWorkers,
                               job_service_pb2.ListWorkersRequest()).workers)

    def report(self, job_id):
        """The job's HTML quality report (JobReport: html, uri); InvalidArgument
        (FAILED_PRECONDITION) while the job has no evaluation results."""
        return self._call(f"report {job_id}", self._stub.GetJobReport,
                          job_service_pb2.GetJobReportRequest(id=job_id))

    # ---- cancel ----------------------------------------------------------------------------

    def cancel(self, job_id, wait=False, timeout=None):
        """Requests cancellation and returns the Job. A job that already ended is returned as
        it is (no error). With wait, blocks until the job has stopped (up to `timeout`
        seconds, else Timeout) and returns the final Job, whatever its state."""
        try:
            job = self._call(f"cancel {job_id}", self._stub.CancelJob,
                             job_service_pb2.CancelJobRequest(id=job_id))
        except InvalidArgument as e:
            # FAILED_PRECONDITION: the job already SUCCEEDED or FAILED; nothing to cancel.
            if e.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            job = self.get(job_id)
            if not is_terminal(job.state):
                raise
            return job
        if not wait or is_terminal(job.state):
            return job
        for _ in self._events(job_id, 0, _deadline(timeout), f"cancel {job_id}"):
            pass
        return self.get(job_id)

    # ---- follow ----------------------------------------------------------------------------

    def watch(self, job_id, after_sequence=0, reconnect_timeout=120.0):
        """Iterates the job's events (JobEvent), history first (after `after_sequence`), until
        the job ends. A dropped connection is resumed after the last sequence seen, for up to
        `reconnect_timeout` seconds of failed reconnects (then Unavailable)."""
        return self._events(job_id, after_sequence, None, f"watch {job_id}", reconnect_timeout)

    def wait(self, job_id, timeout=None, on_event=None):
        """Blocks until the job ends; returns the SUCCEEDED Job. Raises JobFailed (or
        QualityGateFailed) for FAILED, JobCancelled for CANCELLED, Timeout when `timeout`
        seconds pass first. on_event(JobEvent) is called for each event (e.g. to log progress)."""
        for e in self._events(job_id, 0, _deadline(timeout), f"wait {job_id}"):
            if on_event is not None:
                on_event(e)
        job = self.get(job_id)
        if job.state == common_pb2.JOB_STATE_SUCCEEDED:
            return job
        if job.state == common_pb2.JOB_STATE_FAILED:
            raise errors.job_error(job)
        if job.state == common_pb2.JOB_STATE_CANCELLED:
            raise errors.JobCancelled(job)
        raise Timeout(f"job {job_id} is still {state_name(job.state)}", job=job)

    def _events(self, job_id, after, deadline, what, reconnect_timeout=120.0):
        job = self.get(job_id)  # fails fast on an unknown id or an unreachable server
        if is_terminal(job.state) and after > 0:
            return
        last = after
        failing_since = None
        backoff = 0.2
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(f"{what}: timed out with the job {state_name(job.state)}",
                              job=self.get(job_id))
            req = job_service_pb2.WatchJobRequest(id=job_id, after_sequence=last)
            call = self._stub.WatchJob(req, timeout=remaining, metadata=self._metadata)
            terminal = False
            try:
                for e in call:
                    failing_since = None
                    backoff = 0.2
                    last = max(last, e.sequence)
                    if e.job_state:
                        terminal = is_terminal(e.job_state)
                    yield e
                    if terminal:
                        call.cancel()
                        return
                # A clean end without the terminal event: check the job itself.
                job = self.get(job_id)
                if is_terminal(job.state):
                    return
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.CANCELLED and terminal:
                    return
                if (deadline is not None and code == grpc.StatusCode.DEADLINE_EXCEEDED
                        and time.monotonic() >= deadline - 0.05):
                    raise Timeout(f"{what}: timed out", job=self.get(job_id)) from None
                if code not in _TRANSIENT:
                    raise errors.from_rpc_error(e, what) from None
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                elif now - failing_since > reconnect_timeout:
                    raise Unavailable(f"{what}: lost the connection to {self.endpoint} for "
                                      f"{reconnect_timeout:.0f} s: {e.details()}", code) from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                call.cancel()

    # ---- per-layer results -----------------------------------------------------------------

    def layers(self, job_id, page_size=None):
        """Per-layer results of the job's QUANTIZE tasks in plan order (ListLayers, every
        page): one Layer per module, with the worker's metrics once it succeeded and the
        heartbeat's progress while it runs. Works for running and finished jobs."""
        out = []
        req = job_service_pb2.ListLayersRequest(id=job_id, page_size=page_size or 1000)
        while True:
            resp = self._call(f"layers {job_id}", self._stub.ListLayers, req)
            for r in resp.layers:
                out.append(Layer(
                    name=r.module, state=_task_state_name(r.state), attempt=r.attempt + 1,
                    worker_id=r.worker_id, proxy_loss=r.proxy_loss,
                    relative_error=r.relative_error, seconds=r.seconds,
                    bits_per_weight=r.bits_per_weight or None, out_features=r.out_features,
                    in_features=r.in_features, backend=r.backend, progress=r.progress,
                    phase=r.phase, error_reason=r.error.reason, error_message=r.error.message))
            if not resp.next_page_token:
                return out
            req.page_token = resp.next_page_token

    def events(self, job_id, follow=False, after_sequence=0):
        """The job's events (JobEvent) after `after_sequence`: the recorded history, then
        (follow=True) new ones until the job's last, as `qforge events ID [-f]`."""
        if follow:
            yield from self.watch(job_id, after_sequence)
            return
        req = job_service_pb2.WatchJobRequest(id=job_id, after_sequence=after_sequence,
                                              history_only=True)
        try:
            yield from self._stub.WatchJob(req, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, f"events {job_id}") from None

    def delete(self, job_id):
        """Deletes a finished job's record and events from the coordinator (the artifact is
        kept). FailedPrecondition for a job that has not finished; NotFound if unknown."""
        self._call(f"delete {job_id}", self._stub.DeleteJob,
                   job_service_pb2.DeleteJobRequest(id=job_id))


def _tls_credentials(config):
    """grpc.ssl_channel_credentials from the config's PEM files (InvalidArgument naming the
    one that cannot be read; a certificate without its key, or the reverse, too)."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise InvalidArgument("tls_cert and tls_key come together (a client certificate and its key)",
                              field="tls_cert" if not config.tls_cert else "tls_key")
    pem = {}
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(config, name)
        if not path:
            pem[name] = None
            continue
        try:
            with open(path, "rb") as f:
                pem[name] = f.read()
        except OSError as e:
            raise InvalidArgument(f"{name} {path}: cannot be read: {e.strerror}", field=name) from None
    return grpc.ssl_channel_credentials(root_certificates=pem["tls_ca"],
                                        private_key=pem["tls_key"],
                                        certificate_chain=pem["tls_cert"])


def _deadline(timeout):
    return None if timeout is None else time.monotonic() + max(0.0, float(timeout))
