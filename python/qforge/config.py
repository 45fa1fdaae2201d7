"""Where the client connects, resolved exactly as the `qforge` CLI does (client/connection.h).

Endpoint: the argument (non-empty) > $QFORGE_ENDPOINT > the config file's "endpoint" >
127.0.0.1:50051. Token: the argument > $QFORGE_TOKEN > the config file's "token" > none.
The config file is $XDG_CONFIG_HOME/qforge/config.json, else ~/.config/qforge/config.json:
{"endpoint": "host:port", "token": "...", "tls_ca": "ca.pem"}. TLS: tls_ca (the CA that
signed the coordinator's certificate), tls_cert and tls_key (a client certificate), each from
the argument > $QFORGE_TLS_CA / $QFORGE_TLS_CERT / $QFORGE_TLS_KEY > the file. A missing file is fine; an unreadable or malformed
one raises InvalidArgument naming it. The endpoint may be written host:port, http://host:port
or grpc://host:port.
"""
import dataclasses
import json
import os

from .errors import InvalidArgument

DEFAULT_ENDPOINT = "127.0.0.1:50051"


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    endpoint: str = DEFAULT_ENDPOINT
    token: str = ""                  # "" = no authorization metadata
    endpoint_source: str = "default"  # "argument", "env", "config" or "default"
    config_path: str = ""
    # TLS (PEM file paths; all "" = plaintext): argument > $QFORGE_TLS_CA / _CERT / _KEY >
    # the config file's "tls_ca" / "tls_cert" / "tls_key".
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


def default_config_path(environ=None):
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg:
        return os.path.join(xdg, "qforge", "config.json")
    home = env.get("HOME", "")
    if home:
        return os.path.join(home, ".config", "qforge", "config.json")
    return ""


def _normalize(endpoint):
    for scheme in ("http://", "grpc://"):
        if endpoint.startswith(scheme):
            endpoint = endpoint[len(scheme):]
    return endpoint.rstrip("/")


_FILE_KEYS = ("endpoint", "token", "tls_ca", "tls_cert", "tls_key")


def _read_config_file(path):
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"config file {path} cannot be read: {e}", field="config") from None
    try:
        j = json.loads(text)
    except ValueError:
        j = None
    if not isinstance(j, dict):
        raise InvalidArgument(
            f'config file {path} is not a JSON object like {{"endpoint": "host:port", "token": "..."}}',
            field="config")
    values = {}
    for key in _FILE_KEYS:
        if key in j:
            if not isinstance(j[key], str):
                raise InvalidArgument(f'config file {path}: "{key}" must be a string', field=key)
            values[key] = j[key]
    return values


def resolve_config(endpoint=None, token=None, environ=None, config_path=None, *, tls_ca=None,
                   tls_cert=None, tls_key=None):
    """The ClientConfig for the given arguments (None or "" = not given)."""
    env = os.environ if environ is None else environ
    path = default_config_path(env) if config_path is None else config_path
    values = _read_config_file(path)
    file_endpoint, file_token = values.get("endpoint", ""), values.get("token", "")
    env_endpoint = env.get("QFORGE_ENDPOINT", "")
    if endpoint:
        ep, source = endpoint, "argument"
    elif env_endpoint:
        ep, source = env_endpoint, "env"
    elif file_endpoint:
        ep, source = file_endpoint, "config"
    else:
        ep, source = DEFAULT_ENDPOINT, "default"
    tok = token or env.get("QFORGE_TOKEN", "") or file_token
    tls = {name: arg or env.get(f"QFORGE_{name.upper()}", "") or values.get(name, "")
           for name, arg in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key))}
    return ClientConfig(endpoint=_normalize(ep), token=tok, endpoint_source=source,
                        config_path=path or "", **tls)
