"""The MedSapiens Slicer module's helpers: MRML logic, slice geometry, the engine worker's client, dependency set-up."""
