"""Reading and writing images, volumes, landmark files and data sets; atomic writes."""
