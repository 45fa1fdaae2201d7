"""qforge.Client against real coordinator and worker processes (conftest.py): submit, get,
list, watch, wait, cancel and layers; failures mapped to the typed errors; the endpoint and
token resolved from arguments, the environment and the config file as the CLI does."""
import json
import os
import socket
import subprocess
import sys

import pytest

import qforge
from conftest import Service, corrupt_tensor, make_model
from qforge.v1 import common_pb2, job_service_pb2


def hessians(model):
    return os.path.join(model, "hessians.safetensors")


def free_port():
    """A loopback port nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- configuration -----------------------------------------------------------------------

def test_config_precedence_argument_env_file_default(tmp_path):
    cfg = tmp_path / "qforge" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"endpoint": "grpc://file-host:3/", "token": "file-token"}))
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    c = qforge.resolve_config(environ=env)
    assert (c.endpoint, c.token, c.endpoint_source) == ("file-host:3", "file-token", "config")
    assert c.config_path == str(cfg)
    env.update(QFORGE_ENDPOINT="http://env-host:2", QFORGE_TOKEN="env-token")
    c = qforge.resolve_config(environ=env)
    assert (c.endpoint, c.token, c.endpoint_source) == ("env-host:2", "env-token", "env")
    c = qforge.resolve_config("arg-host:1", "arg-token", environ=env)
    assert (c.endpoint, c.token, c.endpoint_source) == ("arg-host:1", "arg-token", "argument")
    c = qforge.resolve_config(environ={"HOME": str(tmp_path / "nohome")})
    assert (c.endpoint, c.token, c.endpoint_source) == ("127.0.0.1:50051", "", "default")
    # Without XDG_CONFIG_HOME the file is ~/.config/qforge/config.json.
    assert qforge.default_config_path({"HOME": "/h"}) == "/h/.config/qforge/config.json"


@pytest.mark.parametrize("text, field", [("[1, 2]", "config"), ("{not json", "config"),
                                          ('{"endpoint": 5}', "endpoint"),
                                          ('{"token": null}', "token")])
def test_a_malformed_config_file_is_an_error_naming_it(tmp_path, text, field):
    cfg = tmp_path / "config.json"
    cfg.write_text(text)
    with pytest.raises(qforge.InvalidArgument) as e:
        qforge.Client(environ={}, config_path=str(cfg))
    assert str(cfg) in str(e.value)
    assert e.value.field == field


def test_the_client_reaches_the_service_through_env_and_config_file(service, tmp_path):
    jobs = qforge.Client(environ={"QFORGE_ENDPOINT": service.endpoint}).list()
    assert isinstance(jobs, list)
    (tmp_path / "qforge").mkdir()
    (tmp_path / "qforge" / "config.json").write_text(json.dumps({"endpoint": service.endpoint}))
    c = qforge.Client(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert c.config.endpoint_source == "config"
    assert isinstance(c.list(), list)


def test_token_from_env_and_config_file_and_tenants_are_separate(idle_service, model, tmp_path):
    a = qforge.Client(environ={"QFORGE_ENDPOINT": idle_service.endpoint, "QFORGE_TOKEN": "token-a"})
    job = a.submit(model, output=str(tmp_path / "out"), hessians=hessians(model))
    (tmp_path / "qforge").mkdir()
    (tmp_path / "qforge" / "config.json").write_text(
        json.dumps({"endpoint": idle_service.endpoint, "token": "token-a"}))
    from_file = qforge.Client(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert from_file.get(job.id).id == job.id
    b = qforge.Client(idle_service.endpoint, "token-b", environ={})
    with pytest.raises(qforge.NotFound):
        b.get(job.id)
    for token in ("wrong-token", ""):
        with pytest.raises(qforge.PermissionDenied) as e:
            qforge.Client(idle_service.endpoint, token or None, environ={}).get(job.id)
        assert e.value.exit_code == 6
    a.cancel(job.id)


# ---- the job loop --------------------------------------------------------------------------

def test_gptq_submit_watch_wait_get_list_layers(service, model, tmp_path):
    c = qforge.Client(service.endpoint, environ={})
    out = str(tmp_path / "gptq")
    job = c.submit(model, output=out, hessians=hessians(model), bits=4, group_size=64,
                   desc_act=True, labels={"team": "ml"}, request_id="py-gptq-1")
    assert job.id and job.spec.gptq.bits == 4 and job.spec.gptq.group_size == 64
    assert job.spec.gptq.desc_act and job.spec.labels["team"] == "ml"
    # The same request id returns the same job (AIP-155).
    again = c.submit(model, output=out, hessians=hessians(model), bits=4, group_size=64,
                     desc_act=True, labels={"team": "ml"}, request_id="py-gptq-1")
    assert again.id == job.id

    events = list(c.watch(job.id))
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert events[-1].job_state == common_pb2.JOB_STATE_SUCCEEDED
    assert any(e.HasField("task") and e.task.kind == common_pb2.TASK_KIND_QUANTIZE and
               e.task.state == common_pb2.TASK_STATE_SUCCEEDED for e in events)
    assert all(qforge.format_event(e) for e in events)

    seen = []
    done = c.wait(job.id, timeout=120, on_event=seen.append)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED
    assert seen and seen[-1].job_state == common_pb2.JOB_STATE_SUCCEEDED
    assert done.manifest_uri.endswith("qforge_manifest.json")
    assert os.path.exists(os.path.join(out, "qforge_manifest.json"))
    assert c.get(job.id).state == common_pb2.JOB_STATE_SUCCEEDED

    assert job.id in [j.id for j in c.list()]
    assert job.id in [j.id for j in c.list(states="succeeded")]
    assert job.id not in [j.id for j in c.list(states=["active"])]
    assert len(c.list(page_size=1, limit=1)) == 1
    with pytest.raises(qforge.InvalidArgument):
        c.list(states="sleeping")

    layers = c.layers(job.id)
    manifest = json.load(open(os.path.join(out, "qforge_manifest.json")))
    assert len(layers) == len(manifest["layers"]) == 14  # 2 decoder layers x 7 projections
    for layer in layers:
        assert layer.state == "SUCCEEDED", layer
        assert layer.name.startswith("model.layers.") and layer.worker_id
        assert layer.attempt == 1
        assert 0 < layer.relative_error < 1 and layer.seconds > 0
        # Stored bits: 4-bit codes + per group of 64 a scale and a zero + g_idx.
        assert 4.0 < layer.bits_per_weight < 5.0, layer
    # Cancelling a job that already succeeded is not an error: it is returned as it is.
    assert c.cancel(job.id).state == common_pb2.JOB_STATE_SUCCEEDED
    assert qforge.client.count_summary(done.tasks) == "14/14 layers + assemble"

    # The event history without following, as `qforge events ID`.
    history = list(c.events(job.id))
    assert [e.sequence for e in history] == sequences
    assert all(e.type != job_service_pb2.EVENT_TYPE_UNSPECIFIED for e in history)
    assert [e.sequence for e in c.events(job.id, after_sequence=sequences[-2])] == sequences[-1:]

    # delete: the job goes, its artifact stays; an unknown job is NotFound.
    c.delete(job.id)
    with pytest.raises(qforge.NotFound):
        c.get(job.id)
    with pytest.raises(qforge.NotFound):
        c.delete(job.id)
    assert os.path.exists(os.path.join(out, "qforge_manifest.json"))


def test_vptq_submit_with_keyword_options(service, model, tmp_path):
    c = qforge.Client(service.endpoint, environ={})
    job = c.submit(model, output=str(tmp_path / "vptq"), method="vptq",
                   hessians=hessians(model), vector_len=4, centroids=16, res_centroids=16,
                   kmeans_iters=2, seed=7, no_perm=True, include=r".*layers\.0\..*_proj\.weight$")
    v = job.spec.vptq
    assert (v.vector_len, v.num_centroids, v.num_res_centroids, v.kmeans_iters, v.seed) == \
        (4, 16, 16, 2, 7)
    assert v.HasField("enable_perm") and not v.enable_perm
    done = c.wait(job.id, timeout=180)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED
    layers = c.layers(job.id)
    assert len(layers) == 7 and all(l.name.startswith("model.layers.0.") for l in layers)
    assert all(l.bits_per_weight and l.bits_per_weight > 0 for l in layers)


def test_validate_only_returns_the_plan_without_a_job(service, model, tmp_path):
    c = qforge.Client(service.endpoint, environ={})
    before = len(c.list())
    plan = c.submit(model, output=str(tmp_path / "v"), hessians=hessians(model),
                    validate_only=True)
    assert plan.tasks.total == 15 and plan.tasks.layers == 14  # 14 layers + assemble
    assert not plan.id
    assert plan.spec.max_attempts > 0  # the normalized spec, defaults filled in
    assert len(c.list()) == before


# ---- typed errors --------------------------------------------------------------------------

def test_client_side_checks_raise_invalid_argument_naming_the_keyword(model):
    # Nothing listens here: these must fail before any RPC.
    c = qforge.Client(f"127.0.0.1:{free_port()}", environ={})
    cases = [
        (dict(method="vptq", bits=4, hessians="h"), "bits"),
        (dict(centroids=256, hessians="h"), "centroids"),
        (dict(method="awq", hessians="h"), "method"),
        (dict(), "calibration"),
        (dict(hessians="h", calibration="none"), "calibration"),
        (dict(calibration="none", calib_samples=4), "calib_samples"),
        (dict(hessians="h", max_kld=0.1), "max_kld"),
    ]
    for kwargs, field in cases:
        with pytest.raises(qforge.InvalidArgument) as e:
            c.submit(model, output="/tmp/never", **kwargs)
        assert e.value.field == field, (kwargs, e.value)
        assert e.value.exit_code == 7


def test_server_invalid_argument_names_the_field(service, model, tmp_path):
    c = qforge.Client(service.endpoint, environ={})
    with pytest.raises(qforge.InvalidArgument) as e:
        c.submit(model, output=str(tmp_path / "o"), hessians=hessians(model), bits=5)
    assert e.value.field == "spec.gptq.bits"
    assert isinstance(e.value, ValueError)
    with pytest.raises(qforge.InvalidArgument) as e:
        c.submit(str(tmp_path / "no-such-model"), output=str(tmp_path / "o"),
                 hessians=hessians(model))
    assert e.value.field == "spec.model_uri"
    assert "does not exist" in str(e.value)


def test_not_found_and_unavailable(service):
    c = qforge.Client(service.endpoint, environ={})
    for call in (c.get, c.cancel, c.layers, lambda i: c.wait(i, timeout=5),
                 lambda i: list(c.watch(i))):
        with pytest.raises(qforge.NotFound) as e:
            call("job-does-not-exist")
        assert e.value.exit_code == 4
    down = qforge.Client(f"127.0.0.1:{free_port()}", environ={}, timeout=2)
    with pytest.raises(qforge.Unavailable) as e:
        down.get("job-x")
    assert e.value.exit_code == 3
    assert down.endpoint in str(e.value)


def test_a_failed_job_raises_job_failed_with_reason_and_subject(service, root, tmp_path):
    bad = make_model(root, "bad-model", layers=1)
    corrupt_tensor(bad, "model.layers.0.mlp.up_proj.weight")
    c = qforge.Client(service.endpoint, environ={})
    job = c.submit(bad, output=str(tmp_path / "out"), hessians=hessians(bad), max_attempts=1)
    with pytest.raises(qforge.JobFailed) as e:
        c.wait(job.id, timeout=180)
    assert not isinstance(e.value, qforge.QualityGateFailed)
    assert e.value.reason, e.value
    assert "model.layers.0.mlp.up_proj" in e.value.subject + e.value.message
    assert e.value.job.state == common_pb2.JOB_STATE_FAILED
    assert e.value.exit_code == 1
    # A FAILED job shows no running task.
    assert c.get(job.id).tasks.running == 0
    failed = [l for l in c.layers(job.id) if l.state == "FAILED"]
    assert [l.name for l in failed] == ["model.layers.0.mlp.up_proj"]
    assert failed[0].error_message


def test_a_missed_quality_gate_raises_quality_gate_failed(service, model, tmp_path):
    c = qforge.Client(service.endpoint, environ={})
    job = c.submit(model, output=str(tmp_path / "gated"), calibration=model + "-calib.safetensors",
                   eval_data=model + "-eval.safetensors", max_kld=0.0,
                   include=r".*layers\.0\.mlp\..*_proj\.weight$")
    assert job.spec.evaluation.HasField("max_kl")
    with pytest.raises(qforge.QualityGateFailed) as e:
        c.wait(job.id, timeout=240)
    assert e.value.reason == "QUALITY_GATE"
    assert e.value.job.quality.gate_enabled and not e.value.job.quality.gate_passed
    assert os.path.exists(str(tmp_path / "gated" / "qforge_manifest.json"))


def test_cancel_wait_timeout_on_a_queued_job(idle_service, model, tmp_path):
    c = qforge.Client(idle_service.endpoint, "token-a", environ={})
    job = c.submit(model, output=str(tmp_path / "out"), hessians=hessians(model))
    assert job.state == common_pb2.JOB_STATE_QUEUED
    with pytest.raises(qforge.Timeout) as e:
        c.wait(job.id, timeout=0.5)
    assert e.value.job.state == common_pb2.JOB_STATE_QUEUED
    assert isinstance(e.value, TimeoutError)
    final = c.cancel(job.id, wait=True, timeout=60)
    assert final.state == common_pb2.JOB_STATE_CANCELLED
    with pytest.raises(qforge.JobCancelled) as e:
        c.wait(job.id, timeout=10)
    assert e.value.exit_code == 5
    # Cancelling a job that already ended is not an error: it is returned as it is.
    assert c.cancel(job.id).state == common_pb2.JOB_STATE_CANCELLED
    events = list(c.watch(job.id))
    assert events[-1].job_state == common_pb2.JOB_STATE_CANCELLED


# ---- the pipeline example ----------------------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "pipeline_step.py")


def run_example(endpoint, *args):
    env = dict(os.environ, QFORGE_ENDPOINT=endpoint)
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_pipeline_step_prints_the_artifact_uri_and_fails_on_a_failed_job(service, model, root,
                                                                        tmp_path):
    out = str(tmp_path / "pipe")
    r = run_example(service.endpoint, "--model", model, "--output", out,
                    "--hessians", hessians(model), "--bits", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == out
    assert "SUCCEEDED" in r.stderr and "model.layers.0" in r.stderr
    bad = make_model(root, "bad-model-2", layers=1)
    corrupt_tensor(bad, "model.layers.0.self_attn.q_proj.weight")
    r = run_example(service.endpoint, "--model", bad, "--output", str(tmp_path / "pipe-bad"),
                    "--hessians", hessians(bad), "--max-attempts", "1")
    assert r.returncode == 1, r.stderr
    assert "failed" in r.stderr and "q_proj" in r.stderr
    assert r.stdout == ""


def test_pip_install_offline_generates_the_stubs(tmp_path):
    """`pip install ./python` with no index: the stubs are generated from the protos and the
    installed package imports on its own (no build-tree stubs on the path)."""
    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    src = tmp_path / "src"
    import shutil
    shutil.copytree(os.path.join(repo, "python"), src / "python",
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    shutil.copytree(os.path.join(repo, "proto"), src / "proto")
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                        "--no-deps", "--quiet", "--target", str(target), str(src / "python")],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "qforge" / "v1" / "job_service_pb2_grpc.py").exists()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-c",
                        "import qforge, qforge.v1.job_service_pb2 as m; "
                        "print(qforge.__file__); print(m.SubmitJobRequest.DESCRIPTOR.full_name)"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(target / "qforge" / "__init__.py"),
                                     "qforge.v1.SubmitJobRequest"]


# ---- TLS ---------------------------------------------------------------------------------

def make_pki(d):
    """A CA and a certificate for 127.0.0.1 signed by it, made with the openssl command."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
            "-days", "2", "-subj", "/CN=qforge python test ca")
    openssl("req", *ec, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
            "-subj", "/CN=localhost")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
            str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.pem"), "-days", "2",
            "-extfile", str(d / "ext"))


def test_tls_from_the_argument_the_environment_and_the_config_file(root, tmp_path):
    make_pki(tmp_path)
    tls = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")]
    svc = Service(root, "tls", workers=0, coordinator_args=tls)
    try:
        ca = str(tmp_path / "ca.pem")
        assert qforge.Client(svc.endpoint, tls_ca=ca, environ={}).list() == []
        assert qforge.Client(svc.endpoint, environ={"QFORGE_TLS_CA": ca}).list() == []
        cfg = tmp_path / "qforge" / "config.json"
        cfg.parent.mkdir()
        cfg.write_text(json.dumps({"endpoint": svc.endpoint, "tls_ca": ca}))
        assert qforge.Client(environ={"XDG_CONFIG_HOME": str(tmp_path)}).list() == []
        # Plaintext to the TLS port: Unavailable, quickly.
        with pytest.raises(qforge.Unavailable):
            qforge.Client(svc.endpoint, environ={}, timeout=3).list()
        with pytest.raises(qforge.InvalidArgument) as e:
            qforge.Client(svc.endpoint, tls_ca=str(tmp_path / "missing.pem"), environ={})
        assert e.value.field == "tls_ca"
    finally:
        svc.stop()
