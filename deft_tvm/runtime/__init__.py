"""The runtime layer: TVM targets for torch devices, compiled kernels cached in memory and on disk,
the committed tuning records they are compiled from, exported kernel libraries, and the backward's
kernel dispatch. Imports the compute layer and the schedules, never the front end or tuning."""
