"""nuclio entry points of the labelassist interactor for CVAT: labelassist.adapters.cvat.serverless."""
from labelassist.adapters.cvat import serverless


def init_context(context):
    serverless.init_interactor(context)


def handler(context, event):
    return serverless.interact(context, event)
