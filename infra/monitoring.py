"""Monitoring: the alarm topic, each model's alarms, and one CloudWatch dashboard.

Everything here lives in the serving stack (``TierserveServing``), beside the models it
watches, for two reasons: CodeDeploy's deployment groups and the inference components'
rolling updates name their model's alarms, which must then be in their stack; and the
pipeline and stream stacks already deploy after the serving stack, so they can publish their
alarms to its topic (``Monitoring.topic``, passed to them) without a cycle. The dashboard reads
the pipeline's queues by a search on the pipeline stack's name, not by reference: a reference
would export every queue and function name across stacks, and CloudFormation refuses to
remove an export another stack still imports (removing a model would fail its deploy).

Metrics (docs/architecture.md, "Metrics"): tierserve's own, EMF in namespace ``Tierserve`` with
the dimensions ``service``, ``model``, ``version``, for what happens inside a process (requests
and their outcome, latency, the model's run, cold starts, restores, loads); AWS's for what
happens around it (API Gateway per stage and resource, Lambda throttles and concurrency,
SageMaker per inference component, SQS).

Alarms per model (each publishes its alarm and its recovery to the one topic):

    server errors   5xx share of the model's requests over ``error_rate_percent``, 2 of 3 minutes
                    (a minute counts from 3 errors)
    latency         p99 over the model's budget (``latency_budget_ms``), 2 of 3 minutes (a
                    minute counts from 5 requests)
    function errors (Lambda tier) the alias's invocations that failed (crash, timeout), 2 of 3 minutes
    throttles       (Lambda tier) any throttled invocation in 5 minutes
    no capacity     (GPU tier) requests refused for want of a copy for longer than a start from
                    zero takes (``gpu_cold_start_minutes`` + 5 minutes, every minute)

The first three (Lambda) or two (GPU) are the model's rollback alarms (infra/rollout.py).
Other constructs add theirs with :meth:`Monitoring.notify` (the dead-letter alarm, the stream's
failures; a drift alarm later).

The topic is encrypted with a customer-managed, rotated key whose policy lets CloudWatch use
it (alarms cannot publish to a topic under the AWS-managed SNS key), TLS-only, and mails
``alarm_email`` when set; without it synth warns that nobody is told
(``tierserve:alarmsWithoutRecipient``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aws_cdk import Annotations, CfnOutput, Duration, Fn, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct, IConstruct

from infra.tierserve_function import METRICS_NAMESPACE, SERVICE_NAME

PERIOD = Duration.minutes(1)
EVALUATION_PERIODS = 3
DATAPOINTS_TO_ALARM = 2
THROTTLE_PERIOD = Duration.minutes(5)
NO_CAPACITY_MARGIN_MINUTES = 5
# Below these a minute says nothing: the rate alarm needs this many errors, the p99 this many requests.
MIN_ERRORS = 3
MIN_LATENCY_SAMPLES = 5
LATENCY_PERCENTILES = ("p50", "p90", "p99")
SAGEMAKER_NAMESPACE = "AWS/SageMaker"
COMPONENT_DIMENSION = "InferenceComponentName"
# Metric names: tierserve's (tierserve/telemetry.py, docs/architecture.md "Metrics").
REQUESTS = "InferenceRequests"
CLIENT_ERRORS = "InferenceClientErrors"
SERVER_ERRORS = "InferenceServerErrors"
LATENCY_MS = "InferenceLatencyMs"
INFERENCE_MS = "InferenceMs"
COLD_START = "ColdStart"
SNAPSTART_RESTORE = "SnapStartRestore"
LOAD_METRICS = ("ModelFetchMs", "ModelDecompressMs", "ModelSessionMs")
PIPELINE_OUTCOMES = ("PipelineOutput", "PipelineError", "PipelineSkipped")
WIDGET_HEIGHT = 6


def tierserve_metric(
    name: str, *, model: str | None = None, version: str | None = None, statistic: str = "Sum"
) -> cloudwatch.Metric:
    """A tierserve EMF metric: for one model version (``model`` and ``version``), or for the
    whole service (neither)."""
    dimensions = {"service": SERVICE_NAME}
    if model is not None:
        dimensions.update(model=model, version=version or "")
    return cloudwatch.Metric(
        namespace=METRICS_NAMESPACE,
        metric_name=name,
        dimensions_map=dimensions,
        statistic=statistic,
        period=PERIOD,
    )


def component_metric(component: str, name: str, statistic: str = "Sum") -> cloudwatch.Metric:
    """An ``AWS/SageMaker`` metric of one inference component."""
    return cloudwatch.Metric(
        namespace=SAGEMAKER_NAMESPACE,
        metric_name=name,
        dimensions_map={COMPONENT_DIMENSION: component},
        statistic=statistic,
        period=PERIOD,
    )


def error_rate(
    errors: cloudwatch.IMetric, requests: cloudwatch.IMetric, label: str
) -> cloudwatch.MathExpression:
    """``errors`` as a percentage of ``requests``, counted from :data:`MIN_ERRORS` errors in a
    minute (a minute with fewer is 0: one transient 503 of a quiet model is no outage)."""
    return cloudwatch.MathExpression(
        expression=f"IF(FILL(errors, 0) >= {MIN_ERRORS}, 100 * FILL(errors, 0) / requests, 0)",
        using_metrics={"errors": errors, "requests": requests},
        label=label,
        period=PERIOD,
    )


def sampled_latency(
    latency: cloudwatch.IMetric, requests: cloudwatch.IMetric, label: str
) -> cloudwatch.MathExpression:
    """``latency`` (a percentile) in minutes with at least :data:`MIN_LATENCY_SAMPLES` requests,
    else 0: the p99 of two requests is the slower one (a cold start, say), not a trend."""
    return cloudwatch.MathExpression(
        expression=f"IF(FILL(requests, 0) >= {MIN_LATENCY_SAMPLES}, latency, 0)",
        using_metrics={"latency": latency, "requests": requests},
        label=label,
        period=PERIOD,
    )


class AlarmTopic(Construct):
    """The one encrypted topic every tierserve alarm publishes to, mailing ``email`` if given.

    Other stacks get it through :meth:`topic_for`, by a named export (``{stack}-AlarmTopicArn``,
    also a stack output for ops), as they get the buckets: no CDK-generated export, and a stable
    name to subscribe to.

    Attributes: ``topic``, ``key``, ``email``, ``export_name``.
    """

    def __init__(self, scope: Construct, construct_id: str, *, email: str | None) -> None:
        super().__init__(scope, construct_id)
        self.email = email
        self.key = kms.Key(
            self,
            "Key",
            description="tierserve: encrypts the alarm topic",
            enable_key_rotation=True,
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                resources=["*"],  # in a key policy, "*" is this key
                # Only for alarms of this account: no other account's CloudWatch may use the key.
                conditions={"StringEquals": {"aws:SourceAccount": Stack.of(self).account}},
            )
        )
        self.topic = sns.Topic(
            self, "Topic", display_name="tierserve alarms", master_key=self.key, enforce_ssl=True
        )
        self.export_name = f"{Stack.of(self).stack_name}-AlarmTopicArn"
        CfnOutput(
            Stack.of(self),
            "AlarmTopicArn",
            value=self.topic.topic_arn,
            export_name=self.export_name,
            description="Every tierserve alarm publishes here (subscribe more than alarm_email's address)",
        )
        if email:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))
        else:
            Annotations.of(self).add_warning_v2(
                "tierserve:alarmsWithoutRecipient",
                "context alarm_email is empty: tierserve's alarms (each model's errors, latency, throttles "
                "and capacity, the pipeline's dead letters) go off, but nobody is told. Set alarm_email in "
                "cdk.json (or cdk deploy -c alarm_email=ops@example.com) to mail alarms and recoveries to "
                "that address, or subscribe something to the topic (stack output AlarmTopicArn).",
            )

    def topic_for(self, consumer: IConstruct) -> sns.ITopic:
        """The topic as ``consumer``'s stack sees it: itself in its own stack, else imported by
        :attr:`export_name` (the consuming stack then deploys after this one)."""
        stack = Stack.of(consumer)
        if stack.node.path == Stack.of(self).node.path:
            return self.topic
        existing = stack.node.try_find_child("AlarmTopic")
        if existing is not None:
            return existing  # type: ignore[return-value]
        stack.add_stack_dependency(Stack.of(self), "publishes its alarms to the alarm topic")
        return sns.Topic.from_topic_arn(stack, "AlarmTopic", Fn.import_value(self.export_name))


def queue_not_empty_alarm(
    scope: Construct, construct_id: str, queue: sqs.IQueue, description: str
) -> cloudwatch.Alarm:
    """An alarm on any message in ``queue`` (a dead-letter or failure queue: each message is
    work that failed every retry), checked every minute."""
    return cloudwatch.Alarm(
        scope,
        construct_id,
        alarm_description=description,
        metric=queue.metric_approximate_number_of_messages_visible(
            period=Duration.minutes(1), statistic="Maximum"
        ),
        threshold=0,
        comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluation_periods=1,
        treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
    )


def notify(alarm: cloudwatch.Alarm, topic: sns.ITopic) -> cloudwatch.Alarm:
    """Publish ``alarm``'s alarm and its recovery to ``topic``."""
    action = cloudwatch_actions.SnsAction(topic)
    alarm.add_alarm_action(action)
    alarm.add_ok_action(action)
    return alarm


@dataclass
class ModelAlarms:
    """One model's alarms. ``rollback`` are those a rollout of the model watches."""

    model: str
    tier: str
    server_errors: cloudwatch.Alarm
    latency: cloudwatch.Alarm
    function_errors: cloudwatch.Alarm | None = None
    throttles: cloudwatch.Alarm | None = None
    no_capacity: cloudwatch.Alarm | None = None

    @property
    def rollback(self) -> list[cloudwatch.Alarm]:
        return [a for a in (self.server_errors, self.latency, self.function_errors) if a is not None]

    @property
    def all(self) -> list[cloudwatch.Alarm]:
        return [*self.rollback, *(a for a in (self.throttles, self.no_capacity) if a is not None)]


@dataclass(frozen=True)
class AlarmPolicy:
    """Thresholds from context: ``error_rate_percent``, the p99 budget per model, and how long
    a GPU-tier model may refuse requests for want of a copy (``no_capacity_minutes``)."""

    error_rate_percent: float
    latency_budget_ms: Mapping[str, float] = field(default_factory=dict)
    default_latency_budget_ms: float = 1000
    no_capacity_minutes: int = 15

    def budget_ms(self, model: str) -> float:
        return self.latency_budget_ms.get(model, self.default_latency_budget_ms)


@dataclass(frozen=True)
class LambdaModel:
    """What the dashboard and alarms need of a Lambda-tier model."""

    name: str
    version: str
    function: lambda_.IFunction
    alias: lambda_.Alias
    other_versions: tuple[str, ...] = ()  # served beside the default, under /versions/{v}


@dataclass(frozen=True)
class GpuModel:
    """What the dashboard and alarms need of a GPU-tier model."""

    name: str
    version: str
    component_name: str


class Monitoring(Construct):
    """The alarm topic, every model's alarms and the tierserve dashboard.

    ``api_name`` and ``stage_name`` locate the API's metrics; ``pipeline_stack`` (a stack name,
    or None) the pipeline's queues, found by a search on it.

    Attributes: ``topic`` (every alarm's action: the hook for other stacks' alarms),
    ``alarm_topic`` (the :class:`AlarmTopic`), ``alarms`` (model name -> :class:`ModelAlarms`),
    ``dashboard``.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        alarm_email: str | None,
        policy: AlarmPolicy,
        api_name: str,
        stage_name: str,
        lambda_models: Sequence[LambdaModel] = (),
        gpu_models: Sequence[GpuModel] = (),
        pipeline_stack: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.alarm_topic = AlarmTopic(self, "Alarms", email=alarm_email)
        self.topic: sns.ITopic = self.alarm_topic.topic
        self._prefix = Stack.of(self).stack_name
        self.alarms: dict[str, ModelAlarms] = {}
        for model in lambda_models:
            self.alarms[model.name] = self._lambda_alarms(model, policy)
        for model in gpu_models:
            self.alarms[model.name] = self._gpu_alarms(model, policy)
        self.dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=self._prefix,
            default_interval=Duration.hours(3),
        )
        self.dashboard.add_widgets(*self._overview(api_name, stage_name))
        for model in lambda_models:
            self.dashboard.add_widgets(*self._lambda_row(model, api_name, stage_name))
        for model in gpu_models:
            self.dashboard.add_widgets(*self._gpu_row(model))
        if pipeline_stack is not None:
            self.dashboard.add_widgets(*self._pipeline_row(pipeline_stack))

    def notify(self, alarm: cloudwatch.Alarm) -> cloudwatch.Alarm:
        """Publish ``alarm`` (alarm and recovery) to the one topic; returns it."""
        return notify(alarm, self.topic)

    # ---- alarms -------------------------------------------------------------------------

    def _alarm(
        self,
        model: str,
        what: str,
        *,
        metric: cloudwatch.IMetric,
        threshold: float,
        description: str,
        evaluation_periods: int = EVALUATION_PERIODS,
        datapoints: int = DATAPOINTS_TO_ALARM,
        comparison: cloudwatch.ComparisonOperator = cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
    ) -> cloudwatch.Alarm:
        alarm = cloudwatch.Alarm(
            self,
            f"{model}-{what}",
            alarm_name=f"{self._prefix}-{model}-{what}",
            alarm_description=f"tierserve model {model}: {description}",
            metric=metric,
            threshold=threshold,
            comparison_operator=comparison,
            evaluation_periods=evaluation_periods,
            datapoints_to_alarm=datapoints,
            # No requests is no failure (and a model at rest must not look broken).
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        return self.notify(alarm)

    def _lambda_alarms(self, model: LambdaModel, policy: AlarmPolicy) -> ModelAlarms:
        def metric(name: str, statistic: str = "Sum") -> cloudwatch.Metric:
            return tierserve_metric(name, model=model.name, version=model.version, statistic=statistic)

        budget = policy.budget_ms(model.name)
        return ModelAlarms(
            model=model.name,
            tier="lambda",
            server_errors=self._alarm(
                model.name,
                "server-errors",
                metric=error_rate(metric(SERVER_ERRORS), metric(REQUESTS), "5xx %"),
                threshold=policy.error_rate_percent,
                description=f"over {policy.error_rate_percent:g}% of requests to version {model.version} "
                "answered 5xx; read the function's logs (request ids in the access log)",
            ),
            latency=self._alarm(
                model.name,
                "latency",
                metric=sampled_latency(metric(LATENCY_MS, "p99"), metric(REQUESTS), "p99 (ms)"),
                threshold=budget,
                description=f"p99 latency of version {model.version} over its budget of {budget:g} ms "
                "(context latency_budget_ms)",
            ),
            function_errors=self._alarm(
                model.name,
                "function-errors",
                metric=model.alias.metric_errors(period=PERIOD, statistic="Sum"),
                threshold=0,
                description="invocations of the live alias failed (a crash, a timeout or running out of "
                "memory: no answer of ours); read the function's logs",
            ),
            throttles=self._alarm(
                model.name,
                "throttles",
                metric=model.function.metric_throttles(period=THROTTLE_PERIOD, statistic="Sum"),
                threshold=0,
                evaluation_periods=1,
                datapoints=1,
                description="Lambda throttled invocations (the account's or the function's concurrency "
                "is exhausted); raise the concurrency quota, or provisioned_concurrency for this model",
            ),
        )

    def _gpu_alarms(self, model: GpuModel, policy: AlarmPolicy) -> ModelAlarms:
        def metric(name: str, statistic: str = "Sum") -> cloudwatch.Metric:
            return component_metric(model.component_name, name, statistic)

        budget = policy.budget_ms(model.name)
        minutes = policy.no_capacity_minutes
        return ModelAlarms(
            model=model.name,
            tier="gpu",
            server_errors=self._alarm(
                model.name,
                "server-errors",
                metric=error_rate(metric("Invocation5XXErrors"), metric("Invocations"), "5xx %"),
                threshold=policy.error_rate_percent,
                description=f"over {policy.error_rate_percent:g}% of invocations of component "
                f"{model.component_name} answered 5xx; read /aws/sagemaker/InferenceComponents/"
                f"{model.component_name}",
            ),
            latency=self._alarm(
                model.name,
                "latency",
                # SageMaker's ModelLatency is in microseconds.
                metric=sampled_latency(metric("ModelLatency", "p99"), metric("Invocations"), "p99 (μs)"),
                threshold=budget * 1000,
                description=f"p99 model latency over its budget of {budget:g} ms (context latency_budget_ms)",
            ),
            no_capacity=self._alarm(
                model.name,
                "no-capacity",
                metric=metric("NoCapacityInvocationFailures"),
                threshold=0,
                evaluation_periods=minutes,
                datapoints=minutes,
                description=f"requests found no copy running for {minutes} minutes in a row, longer than a "
                "start from zero takes: check the component's events and the account's instance quota",
            ),
        )

    # ---- the dashboard ------------------------------------------------------------------

    def _overview(self, api_name: str, stage_name: str) -> list[cloudwatch.IWidget]:
        def api(name: str, statistic: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace="AWS/ApiGateway",
                metric_name=name,
                dimensions_map={"ApiName": api_name, "Stage": stage_name},
                statistic=statistic,
                period=PERIOD,
            )

        alarms = [alarm for model in self.alarms.values() for alarm in model.all]
        widgets: list[cloudwatch.IWidget] = [
            cloudwatch.TextWidget(
                markdown=f"# tierserve\nAPI `{api_name}` stage `{stage_name}`; a row per model below. "
                "Alarms publish to the tierserve alarm topic.",
                width=24,
                height=2,
            ),
            _graph(
                "API requests and errors",
                [api("Count", "Sum"), api("4XXError", "Sum"), api("5XXError", "Sum")],
            ),
            _graph("API latency (ms)", [api("Latency", p) for p in LATENCY_PERCENTILES]),
        ]
        if alarms:
            widgets.append(
                cloudwatch.AlarmStatusWidget(title="tierserve alarms", alarms=alarms, width=8, height=6)
            )
        return widgets

    def _lambda_row(self, model: LambdaModel, api_name: str, stage_name: str) -> list[cloudwatch.IWidget]:
        def metric(name: str, statistic: str = "Sum") -> cloudwatch.Metric:
            return tierserve_metric(name, model=model.name, version=model.version, statistic=statistic)

        resource = f"/v2/models/{model.name}/{{proxy+}}"

        def api_search(name: str, statistic: str) -> cloudwatch.SearchExpression:
            return cloudwatch.SearchExpression(
                expression=(
                    f'SEARCH(\'{{AWS/ApiGateway,ApiName,Method,Resource,Stage}} ApiName="{api_name}" '
                    f'Stage="{stage_name}" Resource="{resource}" MetricName="{name}"\', \'{statistic}\', 60)'
                ),
                label=f"API {name} {statistic}",
            )

        return [
            _title(
                f"{model.name} version {model.version} (Lambda tier"
                + (
                    f"; also serves {', '.join(model.other_versions)}, not shown"
                    if model.other_versions
                    else ""
                )
                + ")"
            ),
            _graph(
                f"{model.name}: requests, 4xx, 5xx",
                [metric(REQUESTS), metric(CLIENT_ERRORS), metric(SERVER_ERRORS)],
                width=6,
            ),
            _graph(
                f"{model.name}: latency (ms)",
                [
                    *(metric(LATENCY_MS, p) for p in LATENCY_PERCENTILES),
                    metric(INFERENCE_MS, "p99"),
                    *(api_search("Latency", p) for p in LATENCY_PERCENTILES),
                ],
                width=6,
            ),
            _graph(
                f"{model.name}: cold starts, restores, model load (ms)",
                [metric(COLD_START), metric(SNAPSTART_RESTORE)],
                right=[metric(name, "Average") for name in LOAD_METRICS],
                width=6,
            ),
            _graph(
                f"{model.name}: throttles and concurrency",
                [model.function.metric_throttles(period=PERIOD, statistic="Sum")],
                right=[model.function.metric("ConcurrentExecutions", period=PERIOD, statistic="Maximum")],
                width=6,
            ),
        ]

    def _gpu_row(self, model: GpuModel) -> list[cloudwatch.IWidget]:
        def metric(name: str, statistic: str = "Sum") -> cloudwatch.Metric:
            return component_metric(model.component_name, name, statistic)

        copies = cloudwatch.MathExpression(
            expression="served / perCopy",
            using_metrics={"served": metric("Invocations"), "perCopy": metric("InvocationsPerCopy")},
            label="copies serving (invocations / invocations per copy)",
            period=PERIOD,
        )
        return [
            _title(f"{model.name} version {model.version} (GPU tier, component {model.component_name})"),
            _graph(
                f"{model.name}: invocations, 4xx, 5xx",
                [metric("Invocations"), metric("Invocation4XXErrors"), metric("Invocation5XXErrors")],
                width=6,
            ),
            _graph(
                f"{model.name}: model latency (microseconds)",
                [metric("ModelLatency", p) for p in LATENCY_PERCENTILES],
                width=6,
            ),
            _graph(f"{model.name}: copies", [copies], width=6),
            _graph(f"{model.name}: no-capacity failures", [metric("NoCapacityInvocationFailures")], width=6),
        ]

    def _pipeline_row(self, pipeline_stack: str) -> list[cloudwatch.IWidget]:
        def queues(name: str) -> cloudwatch.SearchExpression:
            # CloudFormation names the queues {stack}-{logical id}-{suffix}: the inputs queue and
            # the dead-letter queue both match, one line each.
            return cloudwatch.SearchExpression(
                expression=(
                    f'SEARCH(\'{{AWS/SQS,QueueName}} QueueName="{pipeline_stack}" '
                    f"MetricName=\"{name}\"', 'Maximum', 60)"
                ),
                label="",
            )

        per_second = cloudwatch.MathExpression(
            expression="(" + " + ".join(f"FILL(m{i}, 0)" for i in range(len(PIPELINE_OUTCOMES))) + ") / 60",
            using_metrics={f"m{i}": tierserve_metric(name) for i, name in enumerate(PIPELINE_OUTCOMES)},
            label="objects per second (outputs, errors, skipped)",
            period=PERIOD,
        )
        return [
            _title("S3 pipeline"),
            _graph(
                "queue depth (inputs, dead letters)", [queues("ApproximateNumberOfMessagesVisible")], width=8
            ),
            _graph("age of oldest message (s)", [queues("ApproximateAgeOfOldestMessage")], width=8),
            _graph("objects per second", [per_second], width=8),
        ]


def _title(text: str) -> cloudwatch.TextWidget:
    return cloudwatch.TextWidget(markdown=f"## {text}", width=24, height=1)


def _graph(
    title: str,
    left: Iterable[cloudwatch.IMetric],
    *,
    right: Iterable[cloudwatch.IMetric] = (),
    width: int = 8,
) -> cloudwatch.GraphWidget:
    return cloudwatch.GraphWidget(
        title=title, left=list(left), right=list(right), width=width, height=WIDGET_HEIGHT
    )
