"""One S3 code path for AWS and every S3-compatible store (MinIO, Ceph, R2, moto, ...).

Where the endpoint and credentials come from, first match wins:
  endpoint     data.s3.endpoint_url in the YAML > AWS_ENDPOINT_URL_S3 > AWS_ENDPOINT_URL >
               `endpoint_url` in the AWS profile > AWS itself
  credentials  data.s3.anonymous > boto3's chain for data.s3.profile (else AWS_PROFILE / default):
               env keys, shared credentials/config files, SSO, assume-role, container and
               instance roles
  region       data.s3.region > the profile / AWS_REGION / AWS_DEFAULT_REGION > the bucket's region
               (AWS) > us-east-1

boto3 resolves all of that once (`resolve()`); the same resolved values then build both the boto3
client (writing and listing shards) and the `pyarrow.fs.S3FileSystem` that Ray Data reads through,
so the two can never disagree about where the data is. Instance and container roles are left to
pyarrow's own AWS chain, because frozen keys from them would expire during a long run.

Secrets: only `redacted()` is meant for logs and MLflow. It names the endpoint, region, profile and
where the credentials came from, never the keys.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from orchestrator.errors import UserError

# Preflight is meant to fail fast: a dead endpoint should cost seconds, not botocore's default of
# 60 s x several retries.
PREFLIGHT_CONNECT_TIMEOUT_S = 3
PREFLIGHT_READ_TIMEOUT_S = 10
PREFLIGHT_MAX_ATTEMPTS = 2

_REFRESHED_BY_PYARROW = {"iam-role", "container-role"}


def is_s3_url(path: str) -> bool:
    return str(path).startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    p = urlparse(url)
    if p.scheme != "s3" or not p.netloc:
        raise UserError(f"{url}: not an S3 URL; expected s3://bucket/prefix")
    return p.netloc, p.path.lstrip("/")


@dataclass(frozen=True)
class ResolvedS3:
    endpoint_url: Optional[str]  # None: AWS
    region: Optional[str]
    profile: Optional[str]
    anonymous: bool
    credential_method: Optional[str]  # botocore's name for where the keys came from

    @property
    def is_aws(self) -> bool:
        return self.endpoint_url is None or ".amazonaws.com" in self.endpoint_url


def _section_value(s3cfg, name):
    return getattr(s3cfg, name, None) if s3cfg is not None else None


def _session(s3cfg):
    import boto3
    import botocore.exceptions

    profile = _section_value(s3cfg, "profile")
    try:
        return boto3.session.Session(profile_name=profile, region_name=_section_value(s3cfg, "region"))
    except botocore.exceptions.ProfileNotFound:
        raise UserError(f"AWS profile {profile!r} (data.s3.profile) is not in ~/.aws/config or ~/.aws/credentials; "
                        "fix the name or remove data.s3.profile") from None


def _endpoint_from_env_or_profile(session) -> Optional[str]:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        scoped = session._session.get_scoped_config()  # the profile's settings (no secrets read out)
    except Exception:
        return None
    ep = scoped.get("endpoint_url")
    if not ep and isinstance(scoped.get("s3"), dict):
        ep = scoped["s3"].get("endpoint_url")
    return ep or None


def resolve(s3cfg=None) -> ResolvedS3:
    """Endpoint, region and credential source for `s3cfg` (an S3Section or None), resolved by boto3."""
    session = _session(s3cfg)
    endpoint = _section_value(s3cfg, "endpoint_url") or _endpoint_from_env_or_profile(session)
    anonymous = bool(_section_value(s3cfg, "anonymous"))
    method = None
    if not anonymous:
        creds = session.get_credentials()
        method = getattr(creds, "method", None) if creds is not None else None
    region = _section_value(s3cfg, "region") or session.region_name
    return ResolvedS3(endpoint_url=endpoint, region=region, profile=_section_value(s3cfg, "profile"),
                      anonymous=anonymous, credential_method=method)


def redacted(s3cfg=None) -> str:
    """A one-line description safe for logs and MLflow: where, never the keys."""
    try:
        r = resolve(s3cfg)
    except UserError as e:
        return f"s3 (unresolved: {e})"
    creds = "anonymous" if r.anonymous else (r.credential_method or "none found")
    return (f"s3 endpoint={r.endpoint_url or 'aws'} region={r.region or 'auto'} "
            f"profile={r.profile or os.environ.get('AWS_PROFILE') or 'default'} credentials={creds}")


def client(s3cfg=None, *, connect_timeout: float = 10, read_timeout: float = 60, max_attempts: int = 5):
    """A boto3 S3 client for writing and listing (path-style addressing off AWS)."""
    import botocore
    from botocore.config import Config

    r = resolve(s3cfg)
    session = _session(s3cfg)
    kwargs = {}
    if r.anonymous:
        kwargs["signature_version"] = botocore.UNSIGNED
    if not r.is_aws:
        kwargs["s3"] = {"addressing_style": "path"}
    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"max_attempts": max_attempts, "mode": "standard"}, **kwargs)
    return session.client("s3", endpoint_url=r.endpoint_url, region_name=r.region or "us-east-1", config=config)


def arrow_filesystem(s3cfg=None, region: Optional[str] = None):
    """A pyarrow S3FileSystem for Ray Data, from the same resolution as `client()`.

    Paths given to it are 'bucket/key' (no scheme). `region` overrides the resolved one (preflight
    passes the bucket's real region on AWS)."""
    import pyarrow.fs as pafs

    r = resolve(s3cfg)
    kwargs: dict = {"region": region or r.region or "us-east-1"}
    if r.endpoint_url and not r.is_aws:
        p = urlparse(r.endpoint_url if "://" in r.endpoint_url else f"https://{r.endpoint_url}")
        kwargs["endpoint_override"] = p.netloc + p.path.rstrip("/")
        kwargs["scheme"] = p.scheme or "https"
    elif r.endpoint_url:
        kwargs["endpoint_override"] = r.endpoint_url
    if r.anonymous:
        kwargs["anonymous"] = True
    elif r.credential_method not in _REFRESHED_BY_PYARROW:
        session = _session(s3cfg)
        creds = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
            if frozen.token:
                kwargs["session_token"] = frozen.token
    return pafs.S3FileSystem(**kwargs)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def check_reachable(url: str, s3cfg=None, *, must_exist: bool = True) -> Optional[str]:
    """Fail fast, in one line naming `url`, if the endpoint is unreachable, the bucket missing or
    not ours, or (with must_exist) nothing lies under the prefix. Returns the bucket's region
    when the store reports one."""
    import botocore.exceptions as bex

    bucket, prefix = split_url(url)
    r = resolve(s3cfg)
    where = r.endpoint_url or "AWS S3"
    if not r.anonymous and r.credential_method is None:
        raise UserError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                        "AWS_PROFILE, or data.s3.profile (or data.s3.anonymous: true for public buckets)")
    c = client(s3cfg, connect_timeout=PREFLIGHT_CONNECT_TIMEOUT_S, read_timeout=PREFLIGHT_READ_TIMEOUT_S,
               max_attempts=PREFLIGHT_MAX_ATTEMPTS)
    region = None
    try:
        head = c.head_bucket(Bucket=bucket)
        region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if must_exist:
            p = prefix.rstrip("/")
            resp = c.list_objects_v2(Bucket=bucket, Prefix=p, MaxKeys=1)
            if resp.get("KeyCount", 0) == 0:
                raise UserError(f"{url}: no objects under this prefix at {where}; check the URL or write shards "
                                f"there with `llip shards SOURCE --out {url.rstrip('/')}`")
    except UserError:
        raise
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
            bex.ConnectionClosedError) as e:
        raise UserError(f"{url}: S3 endpoint {where} is unreachable ({type(e).__name__}); check "
                        "data.s3.endpoint_url / AWS_ENDPOINT_URL and the network") from None
    except bex.NoCredentialsError:
        raise UserError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                        "AWS_PROFILE, or data.s3.profile") from None
    except bex.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket", "NotFound") or status == 404:
            raise UserError(f"{url}: bucket '{bucket}' does not exist at {where}; create it or fix the URL") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            raise UserError(f"{url}: access denied at {where} ({code}); check the credentials "
                            f"({r.credential_method or 'none'}) and the bucket policy") from None
        raise UserError(f"{url}: S3 error at {where}: {code or status}: {_one_line(e)}") from None
    except bex.BotoCoreError as e:
        raise UserError(f"{url}: S3 endpoint {where} failed ({type(e).__name__}: {_one_line(e)}); check "
                        "data.s3.endpoint_url / AWS_ENDPOINT_URL") from None
    return region


def list_tars(url: str, s3cfg=None) -> list[str]:
    """'bucket/key' paths (pyarrow form) of the .tar objects under url (a prefix or one .tar)."""
    bucket, prefix = split_url(url)
    c = client(s3cfg)
    if prefix.endswith(".tar"):
        return [f"{bucket}/{prefix}"]
    p = prefix.rstrip("/")
    p = p + "/" if p else ""
    out = []
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=p):
        out += [f"{bucket}/{o['Key']}" for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
    return sorted(out)
