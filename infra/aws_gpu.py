"""aws-gpu: fnserve as an ECS service on GPU instances behind an HTTPS load balancer.

ECR repository -> VPC (or existing subnets) -> ECS cluster on the AL2023 ECS GPU AMI (launch template,
autoscaling group, capacity provider with managed scaling and termination protection) -> a task asking for one
GPU, health-checked on /readiness -> a service behind an ALB (HTTPS with an ACM certificate, HTTP redirected,
an idle timeout long enough for SSE) with target-tracking autoscaling; logs with retention; the API keys from
Secrets Manager; IAM roles that can do only what they must.
"""

from __future__ import annotations

import base64
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.aws_common import api_keys_secret, assume_role_policy, image_repository, policy, provider_options
from infra.config import PORT, READY_PATH, StackConfig

GPU_AMI_PARAMETER = "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id"
ALB_IDLE_TIMEOUT = 900  # seconds a stream may stay quiet (a long prefill) before the ALB cuts it
TLS_POLICY = "ELBSecurityPolicy-TLS13-1-2-2021-06"


def build(cfg: StackConfig) -> dict[str, Any]:
    name = cfg.name
    opts = provider_options(cfg)
    instance_type = cfg.get("instanceType", "g5.xlarge")
    memory_mib = int(cfg.get("taskMemoryMiB", 14336))
    cpu_units = int(cfg.get("taskCpu", 3584))
    target_requests = int(cfg.get("targetRequestsPerInstance", 200))
    log_days = int(cfg.get("logRetentionDays", 30))

    repository, image = image_repository(f"{name}-repo", cfg, opts)

    vpc_id, public_subnets = _network(cfg, opts)

    alb_sg = aws.ec2.SecurityGroup(
        f"{name}-alb",
        vpc_id=vpc_id,
        description="fnserve load balancer: HTTPS in (HTTP only to redirect)",
        ingress=[
            {"protocol": "tcp", "from_port": 443, "to_port": 443, "cidr_blocks": ["0.0.0.0/0"]},
            {"protocol": "tcp", "from_port": 80, "to_port": 80, "cidr_blocks": ["0.0.0.0/0"]},
        ],
        egress=[{"protocol": "tcp", "from_port": PORT, "to_port": PORT, "cidr_blocks": ["0.0.0.0/0"]}],
        opts=opts,
    )
    instance_sg = aws.ec2.SecurityGroup(
        f"{name}-instances",
        vpc_id=vpc_id,
        description="fnserve GPU instances: the service port from the load balancer only",
        ingress=[{"protocol": "tcp", "from_port": PORT, "to_port": PORT, "security_groups": [alb_sg.id]}],
        egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"]}],  # ECR, ECS, logs
        opts=opts,
    )

    insights = [{"name": "containerInsights", "value": "enabled"}]
    cluster = aws.ecs.Cluster(f"{name}-cluster", settings=insights, opts=opts)

    instance_role = aws.iam.Role(
        f"{name}-instance", assume_role_policy=assume_role_policy("ec2.amazonaws.com"), opts=opts
    )
    aws.iam.RolePolicyAttachment(
        f"{name}-instance-ecs",
        role=instance_role.name,
        policy_arn="arn:aws:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role",
        opts=opts,
    )
    profile = aws.iam.InstanceProfile(f"{name}-instance", role=instance_role.name, opts=opts)
    invoke = pulumi.InvokeOptions(provider=opts.provider) if opts else None
    ami = aws.ssm.get_parameter_output(name=GPU_AMI_PARAMETER, opts=invoke)
    user_data = cluster.name.apply(
        lambda c: base64.b64encode(
            f"#!/bin/bash\necho ECS_CLUSTER={c} >> /etc/ecs/ecs.config\n"
            "echo ECS_ENABLE_GPU_SUPPORT=true >> /etc/ecs/ecs.config\n".encode()
        ).decode()
    )
    template = aws.ec2.LaunchTemplate(
        f"{name}-gpu",
        image_id=ami.value,
        instance_type=instance_type,
        iam_instance_profile={"arn": profile.arn},
        user_data=user_data,
        network_interfaces=[{"associate_public_ip_address": "true", "security_groups": [instance_sg.id]}],
        metadata_options={"http_tokens": "required", "http_endpoint": "enabled"},
        block_device_mappings=[
            {"device_name": "/dev/xvda", "ebs": {"volume_size": 100, "volume_type": "gp3", "encrypted": "true"}}
        ],
        opts=opts,
    )
    group = aws.autoscaling.Group(
        f"{name}-gpu",
        min_size=cfg.min_instances,
        max_size=cfg.max_instances,
        vpc_zone_identifiers=public_subnets,
        launch_template={"id": template.id, "version": "$Latest"},
        protect_from_scale_in=True,  # the capacity provider's managed termination protection needs it
        tags=[{"key": "AmazonECSManaged", "value": "true", "propagate_at_launch": True}],
        opts=opts,
    )
    provider = aws.ecs.CapacityProvider(
        f"{name}-gpu",
        auto_scaling_group_provider={
            "auto_scaling_group_arn": group.arn,
            "managed_termination_protection": "ENABLED",
            "managed_scaling": {"status": "ENABLED", "target_capacity": 100},
        },
        opts=opts,
    )
    aws.ecs.ClusterCapacityProviders(
        f"{name}-cluster",
        cluster_name=cluster.name,
        capacity_providers=[provider.name],
        default_capacity_provider_strategies=[{"capacity_provider": provider.name, "weight": 1}],
        opts=opts,
    )

    logs = aws.cloudwatch.LogGroup(f"{name}-logs", retention_in_days=log_days, opts=opts)
    secret = api_keys_secret(f"{name}-api-keys", cfg, opts)

    tasks = assume_role_policy("ecs-tasks.amazonaws.com")
    execution_role = aws.iam.Role(f"{name}-execution", assume_role_policy=tasks, opts=opts)
    aws.iam.RolePolicy(
        f"{name}-execution",
        role=execution_role.id,
        policy=policy(
            {"Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": "*"},
            {
                "Effect": "Allow",
                "Action": [
                    "ecr:BatchGetImage",
                    "ecr:GetDownloadUrlForLayer",
                    "ecr:BatchCheckLayerAvailability",
                ],
                "Resource": repository.arn,
            },
            {
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": pulumi.Output.concat(logs.arn, ":*"),
            },
            {"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": secret.arn},
        ),
        opts=opts,
    )
    task_role = aws.iam.Role(f"{name}-task", assume_role_policy=tasks, opts=opts)  # the app calls no AWS API

    container = {
        "name": "fnserve",
        "image": image,
        "essential": True,
        "portMappings": [{"containerPort": PORT, "hostPort": PORT, "protocol": "tcp"}],
        "resourceRequirements": [{"type": "GPU", "value": "1"}],
        "memoryReservation": memory_mib,
        "environment": [{"name": k, "value": v} for k, v in cfg.environment().items()],
        "secrets": [{"name": "FNSERVE_API_KEYS", "valueFrom": secret.arn}],
        "healthCheck": {
            "command": ["CMD", "fnserve", "probe"],  # /readiness on the configured port
            "interval": 15,
            "timeout": 5,
            "retries": 3,
            "startPeriod": 300,
        },
        "stopTimeout": min(cfg.drain_seconds + 15, 120),  # ECS's ceiling on EC2 is 120 s
        "logConfiguration": {
            "logDriver": "awslogs",
            "options": {
                "awslogs-group": logs.name,
                "awslogs-region": aws.get_region_output(opts=invoke).region,
                "awslogs-stream-prefix": "fnserve",
            },
        },
    }
    task = aws.ecs.TaskDefinition(
        f"{name}-task",
        family=name,
        network_mode="host",
        requires_compatibilities=["EC2"],
        cpu=str(cpu_units),
        memory=str(memory_mib),
        execution_role_arn=execution_role.arn,
        task_role_arn=task_role.arn,
        container_definitions=pulumi.Output.json_dumps([container]),
        opts=opts,
    )

    alb = aws.lb.LoadBalancer(
        f"{name}-alb",
        load_balancer_type="application",
        security_groups=[alb_sg.id],
        subnets=public_subnets,
        idle_timeout=ALB_IDLE_TIMEOUT,
        drop_invalid_header_fields=True,
        opts=opts,
    )
    target_group = aws.lb.TargetGroup(
        f"{name}-tg",
        port=PORT,
        protocol="HTTP",
        target_type="instance",
        vpc_id=vpc_id,
        deregistration_delay=cfg.drain_seconds + 5,
        health_check={
            "path": READY_PATH,
            "matcher": "200",
            "interval": 15,
            "timeout": 5,
            "healthy_threshold": 2,
            "unhealthy_threshold": 2,
        },
        opts=opts,
    )
    certificate_arn = _certificate(cfg, alb, opts)
    aws.lb.Listener(
        f"{name}-http",
        load_balancer_arn=alb.arn,
        port=80,
        protocol="HTTP",
        default_actions=[
            {"type": "redirect", "redirect": {"port": "443", "protocol": "HTTPS", "status_code": "HTTP_301"}}
        ],
        opts=opts,
    )
    https = aws.lb.Listener(
        f"{name}-https",
        load_balancer_arn=alb.arn,
        port=443,
        protocol="HTTPS",
        ssl_policy=TLS_POLICY,
        certificate_arn=certificate_arn,
        default_actions=[{"type": "forward", "target_group_arn": target_group.arn}],
        opts=opts,
    )

    service = aws.ecs.Service(
        f"{name}-service",
        cluster=cluster.arn,
        task_definition=task.arn,
        desired_count=cfg.min_instances,
        capacity_provider_strategies=[{"capacity_provider": provider.name, "weight": 1}],
        load_balancers=[{"target_group_arn": target_group.arn, "container_name": "fnserve", "container_port": PORT}],
        health_check_grace_period_seconds=300,
        deployment_minimum_healthy_percent=100,
        deployment_maximum_percent=200,
        opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=[https])),
    )
    scaling = aws.appautoscaling.Target(
        f"{name}-scaling",
        service_namespace="ecs",
        scalable_dimension="ecs:service:DesiredCount",
        resource_id=pulumi.Output.concat("service/", cluster.name, "/", service.name),
        min_capacity=cfg.min_instances,
        max_capacity=cfg.max_instances,
        opts=opts,
    )
    aws.appautoscaling.Policy(
        f"{name}-requests",
        policy_type="TargetTrackingScaling",
        service_namespace=scaling.service_namespace,
        scalable_dimension=scaling.scalable_dimension,
        resource_id=scaling.resource_id,
        target_tracking_scaling_policy_configuration={
            "target_value": target_requests,
            "scale_in_cooldown": 300,
            "scale_out_cooldown": 60,
            "predefined_metric_specification": {
                "predefined_metric_type": "ALBRequestCountPerTarget",
                "resource_label": pulumi.Output.concat(alb.arn_suffix, "/", target_group.arn_suffix),
            },
        },
        opts=opts,
    )
    url = f"https://{cfg.domain}" if cfg.domain else pulumi.Output.concat("https://", alb.dns_name)
    return {"url": url, "repository": repository.repository_url, "cluster": cluster.name}


def _network(cfg: StackConfig, opts: pulumi.ResourceOptions | None) -> tuple[Any, Any]:
    """(vpc id, public subnet ids): existing ones from config, or a two-zone VPC of its own."""
    vpc_id, subnets = cfg.get("vpcId"), cfg.get("publicSubnetIds")
    if vpc_id and subnets:
        return vpc_id, subnets
    name = cfg.name
    vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block="10.42.0.0/16", enable_dns_hostnames=True, opts=opts)
    gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=vpc.id, opts=opts)
    routes = aws.ec2.RouteTable(
        f"{name}-public", vpc_id=vpc.id, routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": gateway.id}], opts=opts
    )
    zones = aws.get_availability_zones_output(state="available")
    ids = []
    for i in range(2):
        subnet = aws.ec2.Subnet(
            f"{name}-public-{i}",
            vpc_id=vpc.id,
            cidr_block=f"10.42.{i}.0/24",
            availability_zone=zones.names[i],
            map_public_ip_on_launch=False,
            opts=opts,
        )
        aws.ec2.RouteTableAssociation(f"{name}-public-{i}", subnet_id=subnet.id, route_table_id=routes.id, opts=opts)
        ids.append(subnet.id)
    return vpc.id, ids


def _certificate(cfg: StackConfig, alb: aws.lb.LoadBalancer, opts: pulumi.ResourceOptions | None) -> Any:
    """An ACM certificate for the domain, validated through DNS in the configured zone; or one given by ARN."""
    given = cfg.get("certificateArn")
    if given:
        return given
    zone_id = cfg.get("zoneId")
    if not cfg.domain or not zone_id:
        raise ValueError(
            "aws-gpu serves HTTPS only: set `domain` and `zoneId` (a Route 53 zone for DNS validation), "
            "or `certificateArn` (an ACM certificate you have)"
        )
    name = cfg.name
    certificate = aws.acm.Certificate(f"{name}-cert", domain_name=cfg.domain, validation_method="DNS", opts=opts)
    option = certificate.domain_validation_options[0]
    record = aws.route53.Record(
        f"{name}-cert-validation",
        zone_id=zone_id,
        name=option.resource_record_name,
        type=option.resource_record_type,
        records=[option.resource_record_value],
        ttl=300,
        allow_overwrite=True,
        opts=opts,
    )
    validation = aws.acm.CertificateValidation(
        f"{name}-cert", certificate_arn=certificate.arn, validation_record_fqdns=[record.fqdn], opts=opts
    )
    aws.route53.Record(
        f"{name}-alias",
        zone_id=zone_id,
        name=cfg.domain,
        type="A",
        aliases=[{"name": alb.dns_name, "zone_id": alb.zone_id, "evaluate_target_health": True}],
        opts=opts,
    )
    return validation.certificate_arn
