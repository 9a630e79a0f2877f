"""An S3 API on this machine for the tests: moto's server in a thread of the test process.

:func:`moto_s3` starts it on ``host`` (``0.0.0.0`` to be reached from network namespaces), creates the
given buckets and yields its endpoint URL; moto accepts any access key until ``/moto-api/reset-auth``
turns authentication on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from airflow_mlops.net import free_port

#: keys the tests' ``aws`` connections use (moto accepts any)
ACCESS_KEY = "AKIAMLOPSTESTS"
SECRET_KEY = "mlops-tests"


@contextlib.contextmanager
def moto_s3(
    buckets: Sequence[str] = (), host: str = "127.0.0.1", url_host: str | None = None, port: int | None = None
) -> Iterator[str]:
    """Run moto's S3 server with ``buckets`` created; yield ``http://<url_host or host>:<port>``.

    ``port`` (default a free one) lets a test start the server again where it was: moto keeps the buckets
    and objects in this process, so a restarted server serves what the stopped one held."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    port = port or free_port()
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    url = f"http://{url_host or host}:{port}"
    try:
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "127.0.0.1") else url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()
        forget_s3_clients()


def forget_s3_clients() -> None:
    """Drop this process's cached S3 filesystems (Airflow's object stores by scheme and connection, fsspec's
    instances): they hold the endpoint of the server that just stopped, and a later server of the session
    listens elsewhere (a process whose S3 endpoint never changes, a worker, never needs this)."""
    import s3fs
    from airflow.sdk.io import store

    store._STORE_CACHE.clear()
    s3fs.S3FileSystem.clear_instance_cache()
