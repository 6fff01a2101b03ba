"""Integrations with other libraries, imported on demand so their dependencies stay optional.

    fused_dora.integrations.peft           enable_fused_dora / disable_fused_dora / fused_dora_status:
                                           serve Hugging Face PEFT's DoRA layers with the fused kernels
    fused_dora.integrations.transformers   FusedDoraCallback: the same for transformers' Trainer and
                                           TRL's trainers, in one line
"""
