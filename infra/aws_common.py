"""What the AWS stacks share: the provider, the image's repository, the API keys' secret, IAM policy
documents, and the environment of a Lambda function (whose only writable place is /tmp)."""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.config import StackConfig

# A Lambda function writes nothing outside /tmp; its first invocation loads its model (readiness is not asked).
LAMBDA_ENVIRONMENT = {
    "FNSERVE_PRELOAD": "[]",
    "FNSERVE_CACHE_DIR": "/tmp/fnserve",
    "NUMBA_CACHE_DIR": "/tmp/numba",
    "HF_HOME": "/tmp/hf",
}


def provider_options(cfg: StackConfig) -> pulumi.ResourceOptions | None:
    """Resources in the configured region, or in the stack's `aws:region` when none is given."""
    if not cfg.region:
        return None
    return pulumi.ResourceOptions(provider=aws.Provider(f"{cfg.name}-aws", region=cfg.region))


def image_repository(
    resource: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None
) -> tuple[aws.ecr.Repository, Any]:
    """The stack's ECR repository (scanned on push), and the image to run: the configured one, else its tag."""
    repository = aws.ecr.Repository(resource, image_scanning_configuration={"scan_on_push": True}, opts=opts)
    image = cfg.image or pulumi.Output.concat(repository.repository_url, ":", cfg.image_tag)
    return repository, image


def api_keys_secret(resource: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None) -> aws.secretsmanager.Secret:
    """A Secrets Manager secret holding the configured API keys (a JSON list), never a plain value."""
    secret = aws.secretsmanager.Secret(resource, description="fnserve API keys (a JSON list)", opts=opts)
    if cfg.api_keys is not None:
        aws.secretsmanager.SecretVersion(resource, secret_id=secret.id, secret_string=cfg.api_keys, opts=opts)
    return secret


def assume_role_policy(service: str) -> str:
    """The trust policy that lets one AWS service take a role."""
    statement = {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def policy(*statements: dict[str, Any]) -> pulumi.Output[str]:
    """An IAM policy document of these statements (their resources may be outputs)."""
    return pulumi.Output.json_dumps({"Version": "2012-10-17", "Statement": list(statements)})
