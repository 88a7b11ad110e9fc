"""Running a stack's build() under Pulumi's mocks, recording every resource it declares.

Each run gets a fresh event loop and a fresh root resource: the loops pytest-asyncio leaves behind otherwise
break the mocks ("no current event loop", "attached to a different loop").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import settings as pulumi_settings

from infra.config import StackConfig

API_KEY = "fns-test-key-that-must-stay-secret"
ZONES = ["us-east-1a", "us-east-1b", "us-east-1c"]


@dataclass
class Resource:
    typ: str
    name: str
    inputs: dict[str, Any]


# Look-ups the stacks make: the GPU AMI's SSM parameter, zones, region, account.
_CALLS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "aws:ssm/getParameter:getParameter": lambda a: {
        "name": a["name"],
        "value": "ami-0gpu",
        "type": "String",
        "arn": "arn:ssm",
        "version": 1,
    },
    "aws:index/getAvailabilityZones:getAvailabilityZones": lambda a: {"names": ZONES, "zoneIds": ZONES, "id": "x"},
    "aws:index/getRegion:getRegion": lambda a: {"name": "us-east-1", "region": "us-east-1", "id": "us-east-1"},
    "aws:index/getCallerIdentity:getCallerIdentity": lambda a: {"accountId": "123456789012", "id": "x"},
}


@dataclass
class Recorder(pulumi.runtime.Mocks):
    resources: list[Resource] = field(default_factory=list)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        self.resources.append(Resource(args.typ, args.name, dict(args.inputs)))
        outputs = dict(args.inputs)
        outputs.setdefault("arn", f"arn:aws:mock:::{args.name}")
        outputs.setdefault("name", args.name)
        if args.typ == "aws:lb/loadBalancer:LoadBalancer":
            outputs.update(dnsName=f"{args.name}.elb.example", arnSuffix=f"app/{args.name}/1", zoneId="ZALB")
        if args.typ == "aws:lb/targetGroup:TargetGroup":
            outputs["arnSuffix"] = f"targetgroup/{args.name}/1"
        if args.typ == "aws:ecr/repository:Repository":
            outputs["repositoryUrl"] = f"123456789012.dkr.ecr.us-east-1.amazonaws.com/{args.name}"
        if args.typ == "aws:acm/certificate:Certificate":
            outputs["domainValidationOptions"] = [
                {"resourceRecordName": "_x.llm.example.com", "resourceRecordType": "CNAME", "resourceRecordValue": "v"}
            ]
        if args.typ == "aws:apigatewayv2/api:Api":
            outputs["apiEndpoint"] = f"https://{args.name}.execute-api.example"
            outputs["executionArn"] = f"arn:aws:execute-api:us-east-1:123456789012:{args.name}"
        if args.typ == "aws:lambda/functionUrl:FunctionUrl":
            outputs["functionUrl"] = f"https://{args.name}.lambda-url.example/"
        if args.typ == "aws:s3/bucket:Bucket":
            outputs["bucket"] = args.name
        if args.typ == "aws:sqs/queue:Queue":
            outputs["url"] = f"https://sqs.us-east-1.amazonaws.com/123456789012/{args.name}"
        if args.typ.startswith("gcp:"):
            outputs.setdefault("project", "my-project")
        if args.typ == "gcp:serviceaccount/account:Account":
            outputs["email"] = f"{args.inputs['accountId']}@my-project.iam.gserviceaccount.com"
        if args.typ == "gcp:cloudrunv2/service:Service":
            outputs["uri"] = f"https://{args.name}.run.app"
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        return _CALLS.get(args.token, lambda a: {})(args.args), []

    def of(self, typ: str) -> list[Resource]:
        """The resources of one type, e.g. `aws:lb/listener:Listener`."""
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> Resource:
        found = self.of(typ)
        assert len(found) == 1, f"{len(found)} resources of {typ}"
        return found[0]

    def text(self, resource: Resource) -> str:
        return json.dumps(resource.inputs, default=str)


def run(build: Callable[[StackConfig], dict[str, Any]], config: dict[str, Any]) -> tuple[Recorder, dict[str, Any]]:
    """build() with `fnserve:*` config (the API keys always set, as a secret); the recorder and the outputs."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    values = {f"fnserve:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    values["fnserve:apiKeys"] = json.dumps([API_KEY])
    pulumi.runtime.set_all_config(values, secret_keys=["fnserve:apiKeys"])
    pulumi_settings.ROOT.set(None)
    recorder = Recorder()
    pulumi.runtime.set_mocks(recorder, project="fnserve", stack="test", preview=False)
    outputs: dict[str, Any] = {}

    @pulumi.runtime.test
    def declare() -> pulumi.Output[Any]:
        declared = build(StackConfig.read(pulumi.Config("fnserve")))
        return pulumi.Output.all(**declared).apply(outputs.update)

    try:
        declare()
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return recorder, outputs


def iam_statements(recorder: Recorder) -> list[dict[str, Any]]:
    """Every statement of every IAM policy the stack declares (role policies, inline policies)."""
    statements = []
    for resource in recorder.resources:
        for key in ("policy", "assumeRolePolicy"):
            raw = resource.inputs.get(key)
            if isinstance(raw, str):
                statements.extend(json.loads(raw)["Statement"])
    return statements


def assert_no_wildcard_admin(recorder: Recorder) -> None:
    for statement in iam_statements(recorder):
        if statement.get("Effect") == "Deny":
            continue  # a deny may be as wide as it likes
        actions = statement.get("Action", [])
        resources = statement.get("Resource", [])
        actions = [actions] if isinstance(actions, str) else actions
        resources = [resources] if isinstance(resources, str) else resources
        assert not (any(a in ("*", "*:*") for a in actions) and "*" in resources), statement
        assert not any(a.endswith(":*") for a in actions), statement


SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"  # how Pulumi marks a secret value on the wire


def assert_secret_only_in(recorder: Recorder, holders: set[str]) -> None:
    """The API key's value appears in no resource but the secret-holding ones, and there only as a Pulumi
    secret (never plain config or a plain environment variable)."""
    found = False
    for resource in recorder.resources:
        text = recorder.text(resource)
        if API_KEY in text:
            assert resource.typ in holders, f"the API key appears in {resource.typ} {resource.name}"
            assert SECRET_SIG in text, f"the API key is not marked secret in {resource.typ} {resource.name}"
            found = True
    assert found, "the API key reached no resource at all"
