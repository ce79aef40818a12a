//! A shard's side of the control plane ([`crate::control`]): one task per SMTP shard takes the requests of its
//! channel one at a time and acts on the shard's own queue and dispatcher (queue changes, injection), or
//! reports its health. Requests are served in order; each answer is sent after its records are durable.

use std::rc::Rc;

use crate::control::{
    ControlError, InjectMessage, InjectReport, QueueCommand, QueueCommandReport, ShardHealth,
    ShardRequest, ShardRequests,
};

use super::Shard;

/// Serves `requests` until every sender is gone (the server is stopping).
pub async fn serve(shard: Rc<Shard>, requests: ShardRequests) {
    while let Ok(req) = requests.recv_async().await {
        match req {
            ShardRequest::Health { answer } => {
                let _ = answer.try_send(health(&shard));
            }
            ShardRequest::Queue { command, answer } => {
                let r = queue_command(&shard, command).await;
                let _ = answer.try_send(r);
            }
            ShardRequest::Inject { message, answer } => {
                let r = inject(&shard, *message).await;
                let _ = answer.try_send(r);
            }
        }
    }
}

fn health(shard: &Shard) -> ShardHealth {
    ShardHealth {
        shard: shard.id,
        answered: true,
        queue_writable: !shard.dispatcher.paused() && shard.queue.sync_failures() == 0,
        pending_messages: shard.queue.store().pending_count() as u64,
    }
}

async fn queue_command(
    _shard: &Rc<Shard>,
    _command: QueueCommand,
) -> Result<QueueCommandReport, ControlError> {
    Err(ControlError::Queue("not built yet".into()))
}

async fn inject(_shard: &Rc<Shard>, _message: InjectMessage) -> Result<InjectReport, ControlError> {
    Err(ControlError::Queue("not built yet".into()))
}
