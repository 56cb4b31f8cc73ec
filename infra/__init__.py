"""tierserve's AWS CDK app: one construct per capability, and the stacks that compose them.

config.py             cdk.json context -> InfraConfig (validated, typed)
model_store.py        ModelStore: model bucket + access logs, per-model read grants (exact keys)
tierserve_function.py TierserveFunction: every tierserve Lambda (image, environment, logs, role)
lambda_tier.py        LambdaModelFunction: the TierserveFunction of one small model
sagemaker_inference.py GpuEndpoint (one per GPU instance type), GpuModelComponent: each heavy model
                      an inference component on it, copies scaling to zero
api.py                InferenceApi: the REST API shell (stage, auth, usage plan, gateway responses)
lambda_routes.py      LambdaModelRoutes: a Lambda-tier model's routes (Lambda proxy)
sagemaker_routes.py   SageMakerModelRoutes: a GPU-tier model's routes (mocks, InvokeEndpoint)
s3_pipeline.py        DataStore (data bucket), InferencePipeline: S3 -> SQS -> worker Lambda
trust.py              service trust policies with confused-deputy conditions
stacks.py             StorageStack, ServingStack, PipelineStack, build_stacks()
nag.py                cdk-nag checks and acknowledgments (each with its reason)
"""
