"""What is computed from landmarks: error metrics, evaluation reports, cephalometric analysis."""
