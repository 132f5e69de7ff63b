"""What one training step computes: the LoRA LightningModule, the flow-matching objective, optimizers."""
