"""tierserve's AWS CDK app: one construct per capability, and the stacks that compose them.

config.py       cdk.json context -> InfraConfig (validated, typed)
model_store.py  ModelStore: model bucket + access logs, per-model read grants
lambda_tier.py  LambdaModelFunction: one container function per small model
gpu_tier.py     GpuModelEndpoint: one autoscaled SageMaker endpoint per heavy model
api.py          InferenceApi: the Open Inference Protocol REST API
s3_pipeline.py  DataStore (data bucket), InferencePipeline: S3 -> SQS -> worker Lambda
stacks.py       StorageStack, ServingStack, PipelineStack, build_stacks()
nag.py          cdk-nag checks and acknowledgments (each with its reason)
"""
