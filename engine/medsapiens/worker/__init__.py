"""The engine worker process: a persistent `python -m medsapiens.worker` that an application (the Slicer module)
starts once and sends detect / finetune requests to, so that engine work never runs in the application's own
process and a loaded model stays warm between requests. protocol.py: the messages and files; server.py: the loop.
"""
