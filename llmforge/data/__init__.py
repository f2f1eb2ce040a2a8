"""Sources, token shards (Megatron indexed format), the prepare pipeline and the training sample order."""
