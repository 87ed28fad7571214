//! The stream multiplexer of TCP connections: yamux (`/yamux/1.0.0`, the yamux spec as libp2p
//! uses it) sending data frames of up to [`SPLIT_SEND_SIZE`] bytes.
//!
//! `libp2p-yamux` 0.48 runs yamux 0.14 with its default configuration, which cuts every write
//! into data frames of at most 16 KiB, and offers no setter for it. yamux writes a frame's
//! 12-byte header and its body as two writes, TLS makes a record of each, and each record went
//! out in its own `writev`: one seed serving 1 GiB made 153,000 `writev` calls averaging 7 KiB,
//! and the kernel's per-segment work on them took about a fifth of both processes' CPU. With
//! 256 KiB frames the body fills the TLS layer's 64 KiB buffer and leaves in a few large
//! `writev`s; the seed's CPU per GiB fell by a fifth (docs/benchmarks.md, 2026-12-03). This
//! module is the same thin adapter as `libp2p-yamux` (yamux's `Connection` as a libp2p
//! `StreamMuxer`) with that one setting changed; see
//! `docs/decisions/0019-record-layer-and-frame-size.md`.
//!
//! The frame size is a sender's choice: every yamux implementation takes frames up to the
//! stream's receive window (256 KiB initially), and rust-yamux up to 1 MiB, so peers running
//! stock `libp2p-yamux` interoperate in both directions (tested below). A receive window never
//! lets a frame exceed what the receiver granted.

use std::{
    collections::VecDeque,
    io, iter,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use futures::{AsyncRead, AsyncWrite, future};
use libp2p::core::{
    muxing::{StreamMuxer, StreamMuxerEvent},
    upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo},
};

/// The largest data frame this node sends, in bytes (yamux's default: 16 KiB).
pub(crate) const SPLIT_SEND_SIZE: usize = 256 * 1024;

/// Inbound streams held while the connection is polled for other work and nobody has asked for
/// them yet; beyond this, new ones are dropped (reset). yamux's own backlog of unacknowledged
/// streams is the same number, so well-behaved remotes stop opening before this.
const MAX_BUFFERED_INBOUND_STREAMS: usize = 256;

/// The multiplexer upgrade for TCP connections: yamux with [`SPLIT_SEND_SIZE`] data frames.
/// Output: a [`Muxer`] over the secured connection.
#[derive(Clone, Debug)]
pub(crate) struct Config(yamux::Config);

impl Default for Config {
    fn default() -> Self {
        let mut config = yamux::Config::default();
        config.set_split_send_size(SPLIT_SEND_SIZE);
        Self(config)
    }
}

impl Config {
    /// The connection over `io` on the side `mode` (the dialer is the client); never fails.
    fn muxer<C>(self, io: C, mode: yamux::Mode) -> future::Ready<Result<Muxer<C>, io::Error>>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        future::ready(Ok(Muxer::new(yamux::Connection::new(io, self.0, mode))))
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        self.muxer(io, yamux::Mode::Server)
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Muxer<C>, io::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        self.muxer(io, yamux::Mode::Client)
    }
}

/// One yamux connection as a libp2p [`StreamMuxer`]. Errors are yamux's
/// [`yamux::ConnectionError`] (I/O, a malformed frame, too many streams, closed).
pub(crate) struct Muxer<C> {
    connection: yamux::Connection<C>,
    /// Inbound streams that arrived while [`StreamMuxer::poll`] drove the connection.
    inbound: VecDeque<yamux::Stream>,
    /// The task waiting in [`StreamMuxer::poll_inbound`], woken when `inbound` gains a stream.
    inbound_waker: Option<Waker>,
}

impl<C> Muxer<C> {
    fn new(connection: yamux::Connection<C>) -> Self {
        Self {
            connection,
            inbound: VecDeque::new(),
            inbound_waker: None,
        }
    }
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Substream = yamux::Stream;
    type Error = yamux::ConnectionError;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        if let Some(stream) = this.inbound.pop_front() {
            return Poll::Ready(Ok(stream));
        }
        match this.connection.poll_next_inbound(cx) {
            Poll::Ready(Some(result)) => Poll::Ready(result),
            Poll::Ready(None) => Poll::Ready(Err(yamux::ConnectionError::Closed)),
            Poll::Pending => {
                this.inbound_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        self.get_mut().connection.poll_new_outbound(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().connection.poll_close(cx)
    }

    /// Drives the connection (reads frames, sends queued ones). An inbound stream that arrives
    /// here is kept for [`StreamMuxer::poll_inbound`]; the task is woken again at once so that
    /// the connection keeps making progress.
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        let stream = match this.connection.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(stream))) => stream,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            Poll::Ready(None) => return Poll::Ready(Err(yamux::ConnectionError::Closed)),
            Poll::Pending => return Poll::Pending,
        };
        if this.inbound.len() >= MAX_BUFFERED_INBOUND_STREAMS {
            tracing::warn!(%stream, "dropping an inbound yamux stream: too many unclaimed");
            drop(stream);
        } else {
            this.inbound.push_back(stream);
            if let Some(waker) = this.inbound_waker.take() {
                waker.wake();
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::core::muxing::StreamMuxerExt;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    use super::*;

    /// An in-memory connection end that counts the writes made to it.
    struct Counted {
        inner: Compat<tokio::io::DuplexStream>,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            let result = Pin::new(&mut this.inner).poll_write(cx, buf);
            if matches!(result, Poll::Ready(Ok(_))) {
                this.writes.fetch_add(1, Ordering::Relaxed);
            }
            result
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_close(cx)
        }
    }

    /// Drives a muxer in the background: yields its first inbound stream on `streams`.
    fn drive<M>(mut muxer: M, streams: tokio::sync::oneshot::Sender<M::Substream>)
    where
        M: StreamMuxer + Unpin + Send + 'static,
        M::Substream: Send,
        M::Error: std::fmt::Debug,
    {
        tokio::spawn(async move {
            let mut streams = Some(streams);
            loop {
                let next = future::poll_fn(|cx| {
                    if let Poll::Ready(s) = muxer.poll_inbound_unpin(cx) {
                        return Poll::Ready(Some(s));
                    }
                    match muxer.poll_unpin(cx) {
                        Poll::Ready(Err(_)) => Poll::Ready(None),
                        _ => Poll::Pending,
                    }
                })
                .await;
                match next {
                    Some(Ok(s)) => {
                        if let Some(tx) = streams.take() {
                            let _ = tx.send(s);
                        }
                    }
                    _ => return,
                }
            }
        });
    }

    /// Sends `payload` from a stream the dialer opens to the listener, returns what the listener
    /// read and how many writes the dialer's side made to the connection.
    async fn transfer<D, L>(dialer: D, listener: L, payload: &[u8]) -> (Vec<u8>, usize)
    where
        D: OutboundConnectionUpgrade<Counted, Info = &'static str>,
        D::Output: StreamMuxer + Unpin + Send + 'static,
        <D::Output as StreamMuxer>::Substream: Send + Unpin,
        <D::Output as StreamMuxer>::Error: std::fmt::Debug,
        D::Error: std::fmt::Debug,
        L: InboundConnectionUpgrade<Counted, Info = &'static str>,
        L::Output: StreamMuxer + Unpin + Send + 'static,
        <L::Output as StreamMuxer>::Substream: Send + Unpin,
        <L::Output as StreamMuxer>::Error: std::fmt::Debug,
        L::Error: std::fmt::Debug,
    {
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let writes = Arc::new(AtomicUsize::new(0));
        let a = Counted {
            inner: a.compat(),
            writes: Arc::clone(&writes),
        };
        let b = Counted {
            inner: b.compat(),
            writes: Arc::new(AtomicUsize::new(0)),
        };
        let mut out = dialer
            .upgrade_outbound(a, "/yamux/1.0.0")
            .await
            .expect("dialer");
        let inb = listener
            .upgrade_inbound(b, "/yamux/1.0.0")
            .await
            .expect("listener");
        let (tx, rx) = tokio::sync::oneshot::channel();
        drive(inb, tx);
        let mut stream = future::poll_fn(|cx| out.poll_outbound_unpin(cx))
            .await
            .expect("open");
        let (dtx, _drx) = tokio::sync::oneshot::channel();
        drive(out, dtx);
        let send = async {
            stream.write_all(payload).await.expect("write");
            stream.close().await.expect("close");
        };
        let receive = async {
            let mut s = rx.await.expect("an inbound stream");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            got
        };
        let ((), got) = tokio::join!(send, receive);
        (got, writes.load(Ordering::Relaxed))
    }

    fn payload() -> Vec<u8> {
        (0..4 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[tokio::test]
    async fn large_frames_carry_a_stream_in_few_writes() {
        let data = payload();
        let (got, ours) = transfer(Config::default(), Config::default(), &data).await;
        assert!(got == data, "the bytes arrive unchanged");
        let (_, stock) = transfer(
            libp2p::yamux::Config::default(),
            libp2p::yamux::Config::default(),
            &data,
        )
        .await;
        // 4 MiB in 16 KiB frames is 256 frames of two writes each; in 256 KiB frames, 16.
        assert!(stock >= 512, "stock yamux made {stock} writes");
        assert!(ours <= 64, "{ours} writes for 4 MiB");
    }

    #[tokio::test]
    async fn interoperates_with_stock_libp2p_yamux_both_ways() {
        let data = payload();
        let (got, _) = transfer(Config::default(), libp2p::yamux::Config::default(), &data).await;
        assert!(got == data, "ours to stock");
        let (got, _) = transfer(libp2p::yamux::Config::default(), Config::default(), &data).await;
        assert!(got == data, "stock to ours");
    }
}
