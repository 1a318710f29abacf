"""Starting or joining Ray: a private loopback-only instance by default, or an existing cluster by address.

A local instance (no address) is started with

* every Ray process bound to ``127.0.0.1``: Ray binds its gRPC servers to the node's IP address, and it
  picks the loopback address as node IP where it does not support clusters (``ray_constants.
  ENABLE_RAY_CLUSTER`` false, i.e. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). normkit sets that flag
  while the instance starts (children inherit it), so on Linux too nothing listens beyond the machine;
* no dashboard (``include_dashboard=False``) and so no HTTP port and no metrics agent;
* token authentication as Ray's default has it (on, unless ``RAY_AUTH_MODE=disabled``; the token is
  kept in ``~/.ray/auth_token``), without the warning Ray prints about that default at every start;
* no usage statistics (``RAY_USAGE_STATS_ENABLED=0``), no Ray Train print patching, worker output not
  forwarded to the driver (``log_to_driver=False``) unless ``verbose``, Ray's own logs at warning level.

One socket is not Ray's: torch's TCP rendezvous store, which rank 0 opens when Ray Train creates the
process group, listens on every interface (torch 2.13 takes no address for it). On a single machine the
training loop rebuilds the group over a store on 127.0.0.1 (:func:`normkit.train.loop.rendezvous_on_loopback`).

An existing cluster is joined by its GCS address. ``ray.init`` retries an address that does not answer
for many minutes, so :func:`check_address` first opens a TCP connection and sends an HTTP/2 preface
(the GCS is a gRPC server, which answers with a SETTINGS frame), with a timeout of a few seconds, and
raises :class:`~normkit.train.errors.ClusterUnreachable` when nothing answers as a GCS would.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import ClusterUnreachable, InsufficientResources, RayNotInstalled

__all__ = [
    "INSTALL_HINT",
    "QUIET_ENV",
    "RayConnection",
    "check_address",
    "check_resources",
    "ray_session",
    "require_ray",
]

INSTALL_HINT = 'pip install "normkit[ray]"'

#: set (unless the user already set them) before Ray starts or is joined
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray Train would otherwise reroute print() in workers through its logger.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Prometheus metrics of the controller and workers: nothing collects them without a dashboard.
    "RAY_TRAIN_METRICS_ENABLED": "0",
}
_CLUSTER_FLAG_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_TRAIN_V2_ENV = "RAY_TRAIN_V2_ENABLED"
#: the logger of Ray's "token authentication is enabled by default" warning
_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
#: the local instance's object store: normkit's data is loaded inside the workers and never passes
#: through it, and a small store avoids Ray's warning on machines with a small /dev/shm
_OBJECT_STORE_BYTES = 128 * 1024 * 1024
#: connection attempts (about a second each) that ray.init makes to a GCS that check_address reached
_GCS_CONNECT_RETRIES_ENV = "RAY_gcs_server_port_wait_time_s"
_GCS_CONNECT_RETRIES = 5
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, stream 0
_HTTP2_SETTINGS = 0x4


def require_ray() -> None:
    """Import Ray Train (V2) and scikit-learn, or raise :class:`RayNotInstalled` saying what to install.

    normkit uses Ray Train V2 (the default in recent Ray, opt-in since 2.43 with
    ``RAY_TRAIN_V2_ENABLED=1``, which is set here unless the user set it): its controller takes no CPU
    and it restarts the workers from the last reported checkpoint.
    """
    os.environ.setdefault(_TRAIN_V2_ENV, "1")  # read when ray.train is first imported
    try:
        import ray.train.torch
        import sklearn  # noqa: F401
    except ImportError as e:
        raise RayNotInstalled(
            f"distributed training needs Ray Train and scikit-learn ({e}); install them with: {INSTALL_HINT}"
        ) from e
    if not ray.train.torch.TorchTrainer.__module__.startswith("ray.train.v2"):
        raise RayNotInstalled(
            f"normkit needs Ray Train V2: Ray {ray.__version__} gave V1 (upgrade with {INSTALL_HINT}; do not "
            f"set {_TRAIN_V2_ENV}=0, and import normkit.train before ray.train)"
        )


@dataclass(frozen=True)
class RayConnection:
    """The Ray instance a :func:`ray_session` runs against."""

    #: the GCS address (``HOST:PORT``) that workers and other drivers use
    address: str
    #: this machine's IP address as Ray knows it (``127.0.0.1`` for a loopback-only instance)
    node_ip: str
    #: True if the session started the instance (and shuts it down on exit)
    started: bool
    #: True if the session found Ray already initialized in this process and reused it
    reused: bool


# --------------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------------


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"Ray address {address!r} is not of the form HOST:PORT (for example 127.0.0.1:6379)")
    if host.startswith("[") and host.endswith("]"):  # [IPv6]:port
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ValueError(f"Ray address {address!r}: port {port_text!r} is not a number in 1-65535")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(host: str, port: int, timeout_s: float) -> str | None:
    """None if a gRPC server answers at ``host:port`` within ``timeout_s``, else why not (one phrase)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as e:
        return f"unknown host {host!r} ({e.strerror})"
    except ConnectionRefusedError:
        return f"connection to {host}:{port} refused: nothing listens there"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e.strerror or e}"
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None  # TLS wraps the HTTP/2 preface; the TCP connection is all we can check cheaply
        try:
            sock.settimeout(timeout_s)
            sock.sendall(_HTTP2_PREFACE + _HTTP2_EMPTY_SETTINGS)
            header = b""
            while len(header) < 9:
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError:
            header = b""
    if len(header) == 9 and header[3] == _HTTP2_SETTINGS:
        return None
    return (
        f"{host}:{port} accepts connections but does not answer as a gRPC server: give the GCS port "
        "(`ray start --head` prints it; default 6379), not the dashboard's (8265) or the Ray Client "
        "server's (10001)"
    )


@dataclass(frozen=True)
class _Target:
    address: str  # where the GCS answered
    loopback_only: bool  # the cluster listens on 127.0.0.1 only: connect with a loopback node IP
    init_address: str = ""  # what ray.init gets ("auto" stays "auto": Ray then uses a local token)

    @property
    def for_init(self) -> str:
        return self.init_address or self.address


def _outward_ip() -> str | None:
    """The IP address Ray uses for this machine when it runs as a cluster node (None if unknown)."""
    try:
        from ray._common.network_utils import node_ip_address_from_perspective
    except ImportError:
        try:  # older Ray
            from ray._private.services import node_ip_address_from_perspective
        except ImportError:
            return None
    try:
        return node_ip_address_from_perspective(None)
    except Exception:  # noqa: BLE001 - any failure just means "no such address"
        return None


def check_address(address: str, timeout_s: float = 3.0) -> str:
    """Check that a Ray GCS answers at ``address`` within ``timeout_s``; return the address to use.

    ``address`` is ``HOST:PORT`` (``[IPv6]:PORT``) or ``"auto"`` (``RAY_ADDRESS``, else the cluster
    last started on this machine by ``ray start``). Takes at most about two ``timeout_s``.

    Raises:
        ValueError: ``address`` is malformed, or a Ray Client (``ray://``) address.
        ClusterUnreachable: nothing answers there as a Ray GCS does (with the reason).
    """
    return _resolve(address, timeout_s).address


def _resolve(address: str, timeout_s: float) -> _Target:
    address = address.strip()
    if address.startswith("ray://"):
        raise ValueError(
            f"Ray Client addresses ({address}) are not supported: run normkit on a node of the cluster "
            "(or submit it with `ray job submit`) and pass the GCS address HOST:PORT"
        )
    if "://" in address:
        raise ValueError(f"Ray address {address!r} is not of the form HOST:PORT (for example 127.0.0.1:6379)")
    auto = address == "auto"
    if auto:
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError as e:
            raise RayNotInstalled(f"Ray is not installed: {INSTALL_HINT}") from e
        try:
            with _loopback_node_ip():  # keeps a loopback address as it is; the candidates below decide
                found = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as e:
            raise ClusterUnreachable(
                f"no running Ray cluster found on this machine ({e}); start one with `ray start --head`"
            ) from e
        if found is None:
            raise ClusterUnreachable("no running Ray cluster found on this machine; start one with `ray start --head`")
        address = found
    host, port = _split_host_port(address)
    candidates = [_Target(address, loopback_only=False)]
    if is_loopback(host):
        # ray.init replaces a loopback host by this machine's outward IP (the node IP of a cluster
        # started with plain `ray start --head`). A cluster started with --node-ip-address=127.0.0.1
        # listens on loopback only: reaching it needs a loopback node IP in this process too.
        outward = _outward_ip()
        if outward is not None and not is_loopback(outward):
            candidates = [
                _Target(_join(outward, port), loopback_only=False),
                _Target(_join("127.0.0.1", port), loopback_only=True),
            ]
        else:
            candidates = [_Target(_join("127.0.0.1", port), loopback_only=True)]
    reasons = []
    for target in candidates:
        reason = _probe(*_split_host_port(target.address), timeout_s)
        if reason is None:
            if auto:
                # Ray enables token authentication on its own only for a cluster it finds itself.
                return _Target(target.address, target.loopback_only, init_address="auto")
            return target
        reasons.append(reason)
    raise ClusterUnreachable(
        f"no Ray cluster answers at {address}: {'; '.join(dict.fromkeys(reasons))}. Start one with "
        "`ray start --head` (it prints the address to pass), or leave the address out to start a private "
        "local instance"
    )


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """While Ray starts or connects: make it take 127.0.0.1 as this node's IP address (see the module doc)."""
    import ray._private.ray_constants as ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    saved_env = os.environ.get(_CLUSTER_FLAG_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by ray._private.services.get_node_ip_address
    os.environ[_CLUSTER_FLAG_ENV] = "0"  # inherited by the processes Ray starts now
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_FLAG_ENV, None)
        else:
            os.environ[_CLUSTER_FLAG_ENV] = saved_env


@contextlib.contextmanager
def _quiet_logger(name: str, verbose: bool) -> Iterator[None]:
    """Raise logger ``name``'s level to ERROR for the block, unless ``verbose``."""
    logger = logging.getLogger(name)
    saved = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """Set environment variable ``name`` to ``value`` for the block, unless the user has set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _set_quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    verbose: bool = False,
    connect_timeout_s: float = 3.0,
) -> Iterator[RayConnection]:
    """Ray for the duration of a ``with`` block: reused, joined at ``address``, or started locally.

    * If Ray is already initialized in this process, it is used as it is and left running (with an
      ``address``, only if that is the cluster it is joined to).
    * With ``address`` (``HOST:PORT`` or ``"auto"``), the cluster there is joined after
      :func:`check_address` and left running on exit.
    * Otherwise a private instance is started on this machine, bound to 127.0.0.1 with no dashboard
      (see the module doc), advertising ``num_cpus`` CPUs (default: the machine's), and shut down on exit.

    Several runs can share one session (``normkit experiment`` does): Ray then starts once.

    Raises:
        RayNotInstalled: Ray Train or scikit-learn is missing.
        ValueError: a malformed address, or Ray is already joined to another cluster in this process.
        ClusterUnreachable: nothing answers at ``address`` as a Ray cluster, or joining it failed.
    """
    require_ray()
    _set_quiet_env()
    import ray

    # The address is checked first, also when Ray already runs here: a wrong one always fails fast.
    target = _resolve(address, connect_timeout_s) if address is not None else None
    if ray.is_initialized():
        connection = _connection(started=False, reused=True)
        if target is not None and not _same_endpoint(target.address, connection.address):
            raise ValueError(
                f"Ray is already initialized in this process, joined to {connection.address}; call "
                f"ray.shutdown() before joining {address}"
            )
        yield connection
        return
    common = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if target is None:
        with _loopback_node_ip(), _quiet_logger(_AUTH_SETUP_LOGGER, verbose):
            ray.init(
                address="local",  # never RAY_ADDRESS: this session owns a fresh instance
                num_cpus=num_cpus,
                object_store_memory=_OBJECT_STORE_BYTES,
                **common,
            )
        connection = _connection(started=True, reused=False)
        if not is_loopback(connection.node_ip):
            warnings.warn(
                f"the local Ray instance took {connection.node_ip} as this machine's address, not 127.0.0.1: "
                "its ports may be reachable from the network",
                RuntimeWarning,
                stacklevel=3,
            )
    else:
        try:
            with contextlib.ExitStack() as stack:
                if target.loopback_only:
                    stack.enter_context(_loopback_node_ip())
                # The GCS has just answered check_address: Ray's 20 attempts would only delay an error
                # such as a missing authentication token.
                stack.enter_context(_env_default(_GCS_CONNECT_RETRIES_ENV, str(_GCS_CONNECT_RETRIES)))
                ray.init(address=target.for_init, **common)
        except (ConnectionError, RuntimeError) as e:
            ray.shutdown()
            hint = ""
            if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                hint = (
                    ". If the cluster uses token authentication (the default of `ray start` in recent Ray), "
                    "set RAY_AUTH_MODE=token and make its token available here (~/.ray/auth_token, "
                    "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
                )
            raise ClusterUnreachable(f"could not join the Ray cluster at {target.address}: {e}{hint}") from e
        connection = _connection(started=False, reused=False)
    try:
        yield connection
    finally:
        ray.shutdown()


def _same_endpoint(a: str, b: str) -> bool:
    """Whether two ``HOST:PORT`` addresses name the same server (a loopback host = this machine's IP)."""
    (host_a, port_a), (host_b, port_b) = _split_host_port(a), _split_host_port(b)
    if port_a != port_b:
        return False
    here = {"127.0.0.1", "::1", "localhost", _outward_ip()}
    return host_a == host_b or (host_a in here and host_b in here) or (is_loopback(host_a) and is_loopback(host_b))


def _connection(started: bool, reused: bool) -> RayConnection:
    import ray

    context = ray.get_runtime_context()
    return RayConnection(
        address=context.gcs_address,
        node_ip=ray.util.get_node_ip_address(),
        started=started,
        reused=reused,
    )


def check_resources(workers: int, use_gpu: bool) -> None:
    """Raise :class:`InsufficientResources` if the cluster has fewer CPUs (GPUs) than ``workers``.

    Compares with the cluster's total resources: a busy cluster makes the run wait, a small one would
    make Ray Train wait forever.
    """
    import ray

    total = ray.cluster_resources()
    kind = "GPU" if use_gpu else "CPU"
    have = total.get(kind, 0.0)
    if have < workers:
        hint = (
            "run with fewer --workers, or without --use-gpu"
            if use_gpu
            else "run with fewer --workers, or on a larger cluster"
        )
        raise InsufficientResources(
            f"the run needs {workers} {kind}s, one per worker, but the Ray cluster has {have:g}; {hint}"
        )
