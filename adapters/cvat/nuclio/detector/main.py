"""nuclio entry points of the labelassist detector for CVAT: labelassist.adapters.cvat.serverless."""
from labelassist.adapters.cvat import serverless


def init_context(context):
    serverless.init_detector(context)


def handler(context, event):
    return serverless.detect(context, event)
