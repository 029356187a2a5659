"""Public ops: autograd Functions, device dispatch, fake registrations and argument checks."""
