//! An update agent that embeds a Shoal node: it downloads one file, checks it in its
//! FileTransferred handler, and completes the job from its JobTransferred handler.
//!
//! Run against any HTTP URL (the SHA-256 is optional):
//! `cargo run -p shoal-node --example update_agent -- URL OUTPUT [SHA256]`

use std::sync::Arc;

use futures::future::BoxFuture;
use shoal_node::{
    Callback, CallbackError, Expected, FileSpec, JobInfo, Node, Priority, TransferredFile,
    ValidationState,
};
use tokio::sync::oneshot;

struct Agent {
    node: Node,
    done: Arc<std::sync::Mutex<Option<oneshot::Sender<String>>>>,
}

impl Callback for Agent {
    fn file_transferred(
        &self,
        _job: JobInfo,
        file: TransferredFile,
    ) -> BoxFuture<'static, ValidationState> {
        // Shoal already verified every byte against the expected digests; an agent can add its
        // own checks (a signature, a package format) on the temporary file here.
        Box::pin(async move {
            match std::fs::metadata(&file.temp_name) {
                Ok(_) => ValidationState::Valid,
                Err(_) => ValidationState::Invalid,
            }
        })
    }

    fn job_transferred(&self, job: JobInfo) -> BoxFuture<'static, Result<(), CallbackError>> {
        // Complete renames the temporary files to their names; only then do they exist.
        let (node, done) = (self.node.clone(), self.done.clone());
        Box::pin(async move {
            let result = node.complete(job.id).await;
            let message = match &result {
                Ok(()) => format!(
                    "completed: {} bytes from peers, {} from the origin",
                    job.bytes_from().peers(),
                    job.bytes_from().origin
                ),
                Err(e) => format!("complete failed: {e}"),
            };
            if let Some(tx) = done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(message);
            }
            result.map_err(|e| CallbackError(e.to_string()))
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(output)) = (args.next(), args.next()) else {
        eprintln!("usage: update_agent URL OUTPUT [SHA256]");
        std::process::exit(2);
    };
    let expected = Expected {
        blake3: None,
        sha256: args.next().map(|h| h.parse()).transpose()?,
    };
    let node = Node::builder().build().await?;
    let job = node.create_job("update", Priority::Normal).await?;
    node.add_file(
        job,
        FileSpec {
            url: url.parse()?,
            local_name: output.into(),
            expected,
            ranges: Vec::new(),
        },
    )
    .await?;
    let (tx, rx) = oneshot::channel();
    node.set_callback(
        job,
        Arc::new(Agent {
            node: node.clone(),
            done: Arc::new(std::sync::Mutex::new(Some(tx))),
        }),
    )
    .await?;
    node.resume(job).await?;
    println!("{}", rx.await?);
    node.shutdown().await;
    Ok(())
}
