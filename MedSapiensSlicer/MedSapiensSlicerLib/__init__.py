"""The MedSapiens Slicer module's helpers: MRML logic, slice geometry, background tasks, dependency set-up."""
