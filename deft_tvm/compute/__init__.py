"""The compute layer: a call's static description (``spec``) and the pure TE computes of the
forward and backward (``forward``, ``backward``, their shared sampling math in ``sampling``;
``kernels`` picks a kernel part's PrimFunc). No torch, no schedule: fusion, tiling and binding are
``deft_tvm.schedules``' decisions."""
