"""A ``distributed.Client`` on a Dask Gateway cluster, from the settings under ``mr.cluster.gateway``.

``resolve_gateway`` reads configuration (and overrides) once, on the client, into a frozen ``GatewaySettings``;
``gateway_client`` starts a cluster through the gateway, scales it and returns a Client that owns it.

Lifetime: the cluster lives as long as the client. Closing the client (leaving ``with gateway_client(s) as client:``,
``client.close()``, or the interpreter exiting) closes the cluster, and the gateway shuts its scheduler and workers
down. With ``shutdown_on_close=False`` the cluster keeps running after the client closes — and keeps its resources —
until it is stopped by name (``with open_gateway() as gw: gw.stop_cluster(name)``) or by the gateway's idle timeout.

Credentials (password, API token) are never logged, never shown in a repr and never quoted in an error message.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from distributed import Client

from mr import config
from mr.errors import InvalidInputError, MrError

log = logging.getLogger(__name__)

AUTH_METHODS = ("simple", "basic", "kerberos", "jupyterhub")
_HIDDEN = "<hidden>"

# GatewaySettings field -> key under mr.cluster.gateway
_CONFIG_KEYS = {
    "address": "address",
    "proxy_address": "proxy-address",
    "public_address": "public-address",
    "auth": "auth",
    "username": "username",
    "password": "password",
    "api_token": "api-token",
    "cluster_options": "cluster-options",
    "workers": "workers",
    "adapt_minimum": "adapt.minimum",
    "adapt_maximum": "adapt.maximum",
    "shutdown_on_close": "shutdown-on-close",
}


class GatewayError(MrError):
    """The gateway could not be reached, refused us, or could not start or scale a cluster.

    The cause is chained, except an HTTP error answer, which is described instead (see ``_failure``)."""


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway is, how mr signs in, what cluster it asks for and how that cluster scales."""

    address: str
    """The gateway's HTTP(S) URL, e.g. ``https://gateway.example.org``."""
    proxy_address: str | int | None = None
    """The scheduler proxy (``gateway://host:port``, ``host:port`` or a port); None: the host and port of address."""
    public_address: str | None = None
    """The gateway as a browser reaches it, the root of the dashboard link; None: address."""
    auth: str | None = None
    """simple | basic (HTTP Basic: username and password) | kerberos | jupyterhub; None: dask-gateway's own
    ``gateway.auth.*`` configuration, which by default sends the local user name and no password."""
    username: str | None = None
    """simple/basic: the user name; None: the local user name."""
    password: str | None = field(default=None, repr=False)
    """simple/basic: the password; never logged nor shown."""
    api_token: str | None = field(default=None, repr=False)
    """jupyterhub: the API token; None: ``$JUPYTERHUB_API_TOKEN``; never logged nor shown."""
    cluster_options: Mapping[str, Any] = field(default_factory=dict)
    """The server's cluster options (worker_cores, worker_memory, image, ...), checked against what it offers."""
    workers: int | None = None
    """A fixed number of workers; exclusive with adaptive scaling."""
    adapt_minimum: int | None = None
    """Adaptive scaling: workers kept when idle (None: 0)."""
    adapt_maximum: int | None = None
    """Adaptive scaling: workers at most (None: no bound but the server's)."""
    shutdown_on_close: bool = True
    """Shut the cluster down when the client closes; False leaves it running on the gateway."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cluster_options", dict(self.cluster_options))  # a copy: the caller's may change
        _check_address("address", self.address)
        if self.public_address is not None:
            _check_address("public_address", self.public_address)
        _check_auth(self)
        _check_scaling(self)

    @property
    def adaptive(self) -> bool:
        """Whether the cluster scales with the work (adapt bounds given) rather than to a fixed count."""
        return self.adapt_minimum is not None or self.adapt_maximum is not None


def resolve_gateway(**overrides: Any) -> GatewaySettings | None:
    """Settings from keyword overrides (GatewaySettings field names), falling back to ``mr.cluster.gateway.*``.

    None when no gateway address is configured: the caller then uses ``mr.cluster.get_client``.
    """
    unknown = set(overrides) - set(_CONFIG_KEYS)
    if unknown:
        raise InvalidInputError(
            "resolve_gateway", sorted(unknown), f"unknown settings; allowed: {sorted(_CONFIG_KEYS)}"
        )
    values = {name: config.get(f"cluster.gateway.{key}", overrides.get(name)) for name, key in _CONFIG_KEYS.items()}
    if not values["address"]:
        return None
    return GatewaySettings(
        address=str(values["address"]),
        proxy_address=values["proxy_address"],
        public_address=_text(values["public_address"]),
        auth=None if values["auth"] in (None, "") else str(values["auth"]).lower(),
        username=_text(values["username"]),
        password=_text(values["password"]),  # environment values may arrive as numbers
        api_token=_text(values["api_token"]),
        cluster_options=_options(values["cluster_options"]),
        workers=_count("workers", values["workers"]),
        adapt_minimum=_count("adapt.minimum", values["adapt_minimum"]),
        adapt_maximum=_count("adapt.maximum", values["adapt_maximum"]),
        shutdown_on_close=_flag("shutdown_on_close", values["shutdown_on_close"]),
    )


def gateway_client(settings: GatewaySettings | None = None) -> Client:
    """A Client on a new cluster of the gateway in ``settings`` (default: ``resolve_gateway()``), scaled as asked.

    Closing the client closes the cluster; see the module docstring for ``shutdown_on_close``.
    """
    settings = _required(settings)
    gateway = _open_gateway(settings)
    cluster = None
    try:
        options = _server_options(gateway, settings)
        cluster = gateway.new_cluster(cluster_options=options, shutdown_on_close=settings.shutdown_on_close)
        _scale(cluster, settings)
        client = GatewayClient(cluster, security=cluster.security, loop=cluster.loop)
    except BaseException as error:
        if cluster is not None:
            _close(cluster, shutdown=True)  # nobody holds it yet: never leave it running
        _close(gateway)
        if isinstance(error, MrError) or not isinstance(error, Exception):
            raise
        raise _failure(settings, error)
    client._mr_owned = (cluster, gateway)
    _log_started(settings, cluster, client)
    return client


@contextlib.contextmanager
def open_gateway(settings: GatewaySettings | None = None) -> Iterator[Any]:
    """A ``dask_gateway.Gateway`` for ``settings``, closed on exit: to list clusters or stop one by name
    (e.g. one left running with ``shutdown_on_close=False``)."""
    settings = _required(settings)
    gateway = _open_gateway(settings)
    try:
        yield gateway
    finally:
        _close(gateway)


class GatewayClient(Client):
    """A Client that owns the Gateway cluster it runs on: closing the client closes the cluster too."""

    _mr_owned: tuple = ()

    def close(self, *args: Any, **kwargs: Any):
        """Close the client, then the cluster (which the gateway shuts down unless ``shutdown_on_close`` is false)."""
        try:
            return super().close(*args, **kwargs)
        finally:
            owned, self._mr_owned = self._mr_owned, ()
            for thing in owned:
                _close(thing)


def _required(settings: GatewaySettings | None) -> GatewaySettings:
    settings = settings or resolve_gateway()
    if settings is None:
        raise InvalidInputError(
            "mr.cluster.gateway.address", None, "set it (or DASK_MR__CLUSTER__GATEWAY__ADDRESS) to the gateway's URL"
        )
    return settings


def _open_gateway(settings: GatewaySettings):
    try:
        from dask_gateway import Gateway
    except ImportError as error:
        raise GatewayError("mr.cluster.gateway needs the dask-gateway package: pip install dask-gateway") from error
    return Gateway(
        address=settings.address,
        proxy_address=settings.proxy_address,
        public_address=settings.public_address,
        auth=_auth(settings),
    )


def _close(thing, **options: Any) -> None:
    """Close a GatewayCluster or a Gateway, and make its ``__del__`` harmless.

    dask-gateway's ``Gateway.__del__`` closes again, and with current distributed that raises from the stopped
    loop: "Exception ignored in __del__", and a SystemError from Python 3.11's compiler when garbage collection
    happens to run it inside ``ast.parse``. ``__del__`` skips a gateway without its loop runner.
    """
    try:
        thing.close(**options)
    finally:
        for gateway in (thing, getattr(thing, "gateway", None)):
            if gateway is not None:
                gateway.__dict__.pop("_loop_runner", None)


def _auth(settings: GatewaySettings):
    """The dask_gateway auth object for ``settings.auth``; None lets dask-gateway's own configuration decide."""
    from dask_gateway.auth import BasicAuth, JupyterHubAuth, KerberosAuth

    if settings.auth in ("simple", "basic"):
        return BasicAuth(settings.username, settings.password)
    if settings.auth == "kerberos":
        if importlib.util.find_spec("kerberos") is None:
            raise GatewayError("auth='kerberos' needs the pykerberos package: pip install dask-gateway[kerberos]")
        return KerberosAuth()
    if settings.auth == "jupyterhub":
        return JupyterHubAuth(settings.api_token)
    return None


def _server_options(gateway, settings: GatewaySettings):
    """The server's cluster options with ours applied, so that a wrong name or value fails here, by name."""
    if not settings.cluster_options:
        return None
    options = gateway.cluster_options()
    for name, value in settings.cluster_options.items():
        key = name if name in options else name.replace("-", "_")
        if key not in options:
            raise InvalidInputError(
                "cluster_options", name, f"the gateway offers no such option; it offers {sorted(options)}"
            )
        try:
            options[key] = value
        except (TypeError, ValueError) as error:
            raise InvalidInputError(f"cluster_options.{key}", value, str(error)) from error
    return options


def _scale(cluster, settings: GatewaySettings) -> None:
    if settings.workers is not None:
        cluster.scale(settings.workers)
    elif settings.adaptive:
        cluster.adapt(minimum=settings.adapt_minimum, maximum=settings.adapt_maximum)


def _log_started(settings: GatewaySettings, cluster, client: Client) -> None:
    if settings.workers is not None:
        scaling = f"{settings.workers} worker{'' if settings.workers == 1 else 's'}"
    elif settings.adaptive:
        scaling = f"adaptive, {settings.adapt_minimum or 0} to {settings.adapt_maximum or 'any number of'} workers"
    else:
        scaling = "no workers requested"
    log.info("Dask Gateway cluster %s on %s (%s)", cluster.name, _redact(settings.address), scaling)
    log.info("Dask dashboard: %s", _redact(client.dashboard_link or ""))
    if not settings.shutdown_on_close:
        log.warning(
            "Dask Gateway cluster %s keeps running after this client closes; stop it with "
            "`with mr.gateway.open_gateway() as gw: gw.stop_cluster(%r)`",
            cluster.name, cluster.name,
        )


def _failure(settings: GatewaySettings, error: Exception) -> GatewayError:
    """The GatewayError for ``error``. An HTTP error is described, not chained: aiohttp's error keeps the request's
    headers, and with them the Authorization header."""
    where = f"starting a cluster on the Dask Gateway at {_redact(settings.address)} failed"
    status = getattr(error, "status", None)
    if isinstance(status, int):
        hint = "; check auth, username and password (mr.cluster.gateway.*)" if status in (401, 403) else ""
        failure = GatewayError(f"{where}: HTTP {status} {getattr(error, 'message', '')}{hint}")
    else:
        failure = GatewayError(f"{where}: {type(error).__name__}: {error}")
        failure.__cause__ = error
    failure.__suppress_context__ = True
    return failure


def _redact(url: str) -> str:
    """``url`` without any user:password@ part, for logs and messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=f"{_HIDDEN}@{netloc}"))


def _check_address(name: str, url: Any) -> None:
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        shown = _redact(url) if isinstance(url, str) else url
        raise InvalidInputError(name, shown, "give the gateway's http(s) URL, e.g. https://gateway.example.org")


def _check_auth(settings: GatewaySettings) -> None:
    if settings.auth is not None and settings.auth not in AUTH_METHODS:
        raise InvalidInputError("auth", settings.auth, f"use one of {', '.join(AUTH_METHODS)}, or null")
    basic = settings.auth in ("simple", "basic")
    for name in ("username", "password"):
        if getattr(settings, name) is not None and not basic:
            shown = _HIDDEN if name == "password" else settings.username
            raise InvalidInputError(name, shown, f"is used with auth 'simple' or 'basic', not {settings.auth!r}")
    if settings.api_token is not None and settings.auth != "jupyterhub":
        raise InvalidInputError("api_token", _HIDDEN, f"is used with auth 'jupyterhub', not {settings.auth!r}")


def _check_scaling(settings: GatewaySettings) -> None:
    for name in ("workers", "adapt_minimum", "adapt_maximum"):
        _count(name, getattr(settings, name))
    if settings.workers is not None and settings.adaptive:
        raise InvalidInputError("workers", settings.workers, "give a fixed workers count or adapt bounds, not both")
    low, high = settings.adapt_minimum, settings.adapt_maximum
    if high is not None and (high < 1 or (low is not None and low > high)):
        raise InvalidInputError("adapt_maximum", high, f"must be at least 1 and at least adapt_minimum ({low})")


def _count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(name, value, "must be a whole number of workers, 0 or more, or null")
    return value


def _flag(name: str, value: Any) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in words:
        return words[str(value).strip().lower()]
    raise InvalidInputError(name, value, "must be true or false")


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _options(value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            "cluster_options", value, "give a mapping of option names to values, e.g. {worker_cores: 2}"
        )
    return {str(k): v for k, v in value.items()}
