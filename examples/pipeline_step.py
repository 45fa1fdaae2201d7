#!/usr/bin/env python3
"""A pipeline step (what an Airflow or Kubeflow task runs): quantize a model with qforge.

Submits the job, streams its progress to the log (stderr), and on success prints the
artifact's URI as the last line of stdout (a Kubeflow output / an Airflow XCom); a failed,
cancelled or unreachable job fails the task with the `qforge` CLI's exit code (1 job failed or
quality gate missed, 3 coordinator unavailable, 5 cancelled, 6 permission denied, 7 invalid
argument). The endpoint and token come from QFORGE_ENDPOINT / QFORGE_TOKEN or the config file.

    python3 examples/pipeline_step.py --model s3://models/llama --output s3://models/llama-gptq \
        --calibration s3://data/calib.safetensors --bits 4 --group-size 128 --desc-act
    python3 examples/pipeline_step.py --method vptq --vector-len 8 --centroids 65536 ...
"""
import argparse
import logging
import sys

import qforge

log = logging.getLogger("qforge-step")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory URI")
    p.add_argument("--output", required=True, help="output directory URI (must be empty)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--calibration", help="token data URI, or 'none' (data-free)")
    src.add_argument("--hessians", help="Hessian safetensors URI")
    p.add_argument("--method", choices=("gptq", "vptq"), default="gptq")
    p.add_argument("--bits", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--desc-act", action="store_true", default=None)
    p.add_argument("--vector-len", type=int)
    p.add_argument("--centroids", type=int)
    p.add_argument("--res-centroids", type=int)
    p.add_argument("--eval", dest="eval_data", help="held-out token data: evaluate the artifact")
    p.add_argument("--max-ppl-increase", type=float, help="quality gate: max perplexity increase, %%")
    p.add_argument("--max-kld", type=float, help="quality gate: max mean KL divergence")
    p.add_argument("--max-attempts", type=int, default=0)
    p.add_argument("--request-id", help="idempotency key: a retried task finds the same job "
                   "(e.g. the Airflow run id + task id)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    return p.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    a = parse_args(argv)
    options = {k: v for k, v in dict(
        calibration=a.calibration, hessians=a.hessians, bits=a.bits, group_size=a.group_size,
        desc_act=a.desc_act, vector_len=a.vector_len, centroids=a.centroids,
        res_centroids=a.res_centroids, eval_data=a.eval_data,
        max_ppl_increase=a.max_ppl_increase, max_kld=a.max_kld).items() if v is not None}
    try:
        with qforge.Client() as client:
            job = client.submit(a.model, output=a.output, method=a.method,
                                max_attempts=a.max_attempts, request_id=a.request_id,
                                **options)
            log.info("submitted job %s to %s", job.id, client.endpoint)
            job = client.wait(job.id, timeout=a.timeout,
                              on_event=lambda e: log.info("%s", qforge.format_event(e)))
            if job.HasField("quality"):
                q = job.quality
                log.info("quality: perplexity %.3f -> %.3f (%+.2f%%), mean KL %.4f",
                         q.ppl_reference, q.ppl_quantized, q.ppl_increase_pct, q.mean_kl)
            worst = sorted(client.layers(job.id), key=lambda l: -l.relative_error)[:3]
            for layer in worst:
                log.info("largest error: %s %.2e", layer.name, layer.relative_error)
    except qforge.QforgeError as e:
        log.error("%s: %s", type(e).__name__, e)
        return e.exit_code
    log.info("job %s succeeded; manifest %s", job.id, job.manifest_uri)
    print(job.spec.output_uri, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
