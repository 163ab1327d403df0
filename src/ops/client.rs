//! [`ApiClient`]: requests to the supervisor over MQTT, one at a time, each waiting (bounded)
//! for its answer; uploads send a window of chunks at a time.

use std::io::SeekFrom;
use std::time::Duration;

use base64::Engine as _;
use protocol::api::{ApiOp, ApiRequest, ApiResponse, ApiResult, UploadChunk};
use protocol::{CommandId, Payload as _, Topic, Topics, Version};
use rumqttc::{QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::gcode::GcodeFile;
use super::mqtt::{api_client_name, Link, LinkEvent};
use super::{Endpoint, OpsError};

/// Bytes per `upload_chunk` request (the protocol's largest chunk).
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Refused rounds in a row that store nothing new before an upload gives up.
const MAX_STALLS: u32 = 3;

/// Upload chunks in flight at once: 16 × 64 KiB = 1 MiB, 20 MB/s over a 50 ms round trip.
pub const UPLOAD_WINDOW: usize = 16;

/// A connection to the supervisor's operator API.
pub struct ApiClient {
    link: Link,
    /// The name answers come back under ([`api_client_name`]), shared by this user's runs.
    name: protocol::ClientId,
    topics: Topics,
    response_topic: String,
    timeout: Duration,
    next_id: u64,
}

/// The operation's name on the wire, for messages.
pub fn op_name(op: &ApiOp) -> &'static str {
    match op {
        ApiOp::UploadChunk(_) => "upload_chunk",
        ApiOp::SubmitJob(_) => "submit_job",
        ApiOp::CancelJob(_) => "cancel_job",
        ApiOp::RequeueJob(_) => "requeue_job",
        ApiOp::SetPriority(_) => "set_priority",
        ApiOp::ListJobs(_) => "list_jobs",
        ApiOp::ListPrinters(_) => "list_printers",
        ApiOp::BedClear(_) => "bed_clear",
        ApiOp::ReleasePrinter(_) => "release_printer",
        ApiOp::PausePrinter(_) => "pause_printer",
        ApiOp::ResumePrinter(_) => "resume_printer",
        ApiOp::ForgetPrinter(_) => "forget_printer",
    }
}

impl ApiClient {
    /// Connects with a fresh client id and subscribes to the response topic of its user
    /// ([`api_client_name`]), waiting for the SUBACK, so no answer can be missed.
    pub async fn connect(ep: &Endpoint) -> Result<ApiClient, OpsError> {
        let mut link = Link::connect(ep, false).await?;
        let name = api_client_name(ep);
        let response_topic = ep.topics.format(&Topic::ApiResponse(name.clone()));
        link.subscribe(&response_topic, QoS::AtLeastOnce).await?;
        let secs = ep.timeout.as_secs().max(1);
        let acked = tokio::time::timeout(ep.timeout, async {
            loop {
                match link.next().await {
                    Some(LinkEvent::SubAck(codes)) => return Ok(codes),
                    Some(LinkEvent::Down { reason }) => return Err(reason),
                    Some(_) => continue,
                    None => return Err("the connection ended".to_owned()),
                }
            }
        })
        .await;
        match acked {
            Ok(Ok(codes))
                if codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))) => {}
            Ok(Ok(_)) => {
                return Err(OpsError::SubscribeRefused {
                    broker: link.broker.clone(),
                    filter: response_topic,
                })
            }
            Ok(Err(reason)) => {
                return Err(OpsError::ConnectionLost {
                    broker: link.broker.clone(),
                    reason,
                })
            }
            Err(_) => {
                return Err(OpsError::BrokerTimeout {
                    broker: link.broker.clone(),
                    what: "subscribing to the response topic",
                    secs,
                })
            }
        }
        Ok(ApiClient {
            link,
            name,
            topics: ep.topics.clone(),
            response_topic,
            timeout: ep.timeout,
            next_id: 0,
        })
    }

    /// Sends one request and waits for its answer: the result if `ok`, else
    /// [`OpsError::Refused`] with the supervisor's reason. A `busy` answer (this client went
    /// over its rate) is waited out and the request sent again, within the same timeout.
    pub async fn request(&mut self, op: ApiOp) -> Result<ApiResult, OpsError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match self.request_once(op.clone(), deadline).await? {
                Attempt::Done(result) => return result,
                Attempt::Busy(wait) => {
                    let at = tokio::time::Instant::now() + wait;
                    if at >= deadline {
                        let secs = self.timeout.as_secs().max(1);
                        return Err(OpsError::NoAnswer {
                            broker: self.link.broker.clone(),
                            secs,
                        });
                    }
                    tracing::debug!(?wait, "the supervisor is busy with this client: waiting");
                    tokio::time::sleep_until(at).await;
                }
            }
        }
    }

    async fn request_once(
        &mut self,
        op: ApiOp,
        deadline: tokio::time::Instant,
    ) -> Result<Attempt, OpsError> {
        let name = op_name(&op);
        let id = self.send(op, deadline).await?;
        loop {
            let response = self.next_answer(deadline).await?;
            if response.id != id {
                tracing::debug!(id = %response.id, "ignoring an answer to another request");
                continue;
            }
            return Ok(settle(name, response));
        }
    }

    /// Publishes one request (without waiting for its answer) and returns its id.
    async fn send(
        &mut self,
        op: ApiOp,
        deadline: tokio::time::Instant,
    ) -> Result<CommandId, OpsError> {
        self.next_id += 1;
        let id = CommandId::new(format!("{}-{}", self.link.client_id, self.next_id))
            .unwrap_or_else(|_| unreachable!("a client id plus a counter is a valid command id"));
        let request = ApiRequest {
            v: Version,
            id: id.clone(),
            client: self.name.clone(),
            op,
        };
        let broker = self.link.broker.clone();
        let secs = self.timeout.as_secs().max(1);
        let topic = self.topics.format(&Topic::ApiRequest);
        let sent = tokio::time::timeout_at(
            deadline,
            self.link
                .client
                .publish(topic, QoS::AtLeastOnce, false, request.encode()),
        )
        .await;
        match sent {
            Ok(Ok(())) => Ok(id),
            Ok(Err(e)) => Err(OpsError::ConnectionLost {
                broker,
                reason: e.to_string(),
            }),
            Err(_) => Err(OpsError::NoAnswer { broker, secs }),
        }
    }

    /// The next answer on our response topic (to any request), by `deadline`.
    async fn next_answer(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<ApiResponse, OpsError> {
        let broker = self.link.broker.clone();
        let secs = self.timeout.as_secs().max(1);
        loop {
            let event = match tokio::time::timeout_at(deadline, self.link.next()).await {
                Err(_) => return Err(OpsError::NoAnswer { broker, secs }),
                Ok(None) => {
                    return Err(OpsError::ConnectionLost {
                        broker,
                        reason: "the connection ended".into(),
                    })
                }
                Ok(Some(event)) => event,
            };
            let payload = match event {
                LinkEvent::Message { topic, payload } if topic == self.response_topic => payload,
                LinkEvent::Down { reason } => {
                    return Err(OpsError::ConnectionLost { broker, reason })
                }
                _ => continue,
            };
            match ApiResponse::decode(&payload) {
                Ok(r) => return Ok(r),
                Err(e) => tracing::warn!(error = %e, "ignoring an undecodable answer"),
            }
        }
    }

    /// Uploads `file` in [`CHUNK_SIZE`] chunks, up to [`UPLOAD_WINDOW`] of them in flight (a
    /// link's round trip is paid once per window, not once per chunk). The supervisor answers
    /// each with how much it holds (`received`, contiguous from 0). The first chunk goes alone:
    /// its answer says where a cut upload resumes (a file already stored takes one request).
    ///
    /// Sending goes in rounds. When an answer to this round's chunks is not a step forward
    /// (busy: the client's rate; or refused, typically because a chunk before it was not
    /// stored), a new round starts from what the supervisor holds, after the wait a busy
    /// answer asks for; answers to older rounds still count when they report progress, and
    /// their refusals are the expected fallout. [`MAX_STALLS`] refused rounds with nothing
    /// stored in between give up with the first refusal's reason; so does a whole timeout
    /// without progress. `progress(received, total)` is called after every answer.
    pub async fn upload(
        &mut self,
        file: &GcodeFile,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), OpsError> {
        let fail = |reason: String| OpsError::Upload {
            path: file.path.clone(),
            reason,
        };
        let io = |source| OpsError::Io {
            path: file.path.clone(),
            source,
        };
        let mut reader = tokio::fs::File::open(&file.path).await.map_err(io)?;
        let total = file.size;
        // Bytes the supervisor said it holds; the next byte to send.
        let (mut held, mut next) = (0u64, 0u64);
        // Chunks in flight at most: one until the first answer (it says where to resume), then
        // one more per chunk stored up to UPLOAD_WINDOW, halved when the supervisor says busy
        // (so a client settles at its rate instead of sending rounds it will refuse).
        let mut window = 1usize;
        // Requests not answered yet, with the round they were sent in.
        let mut pending: std::collections::HashMap<CommandId, u64> = Default::default();
        let mut round = 0u64;
        let mut stalls = 0u32;
        let mut first_refusal: Option<OpsError> = None;
        let mut progress_by = tokio::time::Instant::now() + self.timeout;
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            while pending.len() < window && next < total {
                let len =
                    usize::try_from((total - next).min(CHUNK_SIZE as u64)).unwrap_or(CHUNK_SIZE);
                reader.seek(SeekFrom::Start(next)).await.map_err(io)?;
                reader.read_exact(&mut buf[..len]).await.map_err(io)?;
                let op = ApiOp::UploadChunk(UploadChunk {
                    sha256: file.sha256.clone(),
                    offset: next,
                    total_size: total,
                    data_b64: base64::engine::general_purpose::STANDARD.encode(&buf[..len]),
                });
                pending.insert(self.send(op, progress_by).await?, round);
                next += len as u64;
            }
            let response = match self.next_answer(progress_by).await {
                Ok(r) => r,
                Err(OpsError::NoAnswer { .. }) if first_refusal.is_some() => {
                    return Err(first_refusal.unwrap_or_else(|| unreachable!()))
                }
                Err(e) => return Err(e),
            };
            let Some(sent_in) = pending.remove(&response.id) else {
                tracing::debug!(id = %response.id, "ignoring an answer to another request");
                continue;
            };
            let current = sent_in == round;
            match settle("upload_chunk", response) {
                Attempt::Done(Ok(ApiResult::Uploaded {
                    received,
                    total_size,
                })) => {
                    if total_size != total {
                        return Err(fail(format!(
                            "the supervisor says the file has {total_size} bytes; it has {total}"
                        )));
                    }
                    if received > total {
                        return Err(fail(format!(
                            "the supervisor says it holds {received} of {total} bytes"
                        )));
                    }
                    progress(received, total);
                    if received == total {
                        return Ok(());
                    }
                    window = (window + 1).min(UPLOAD_WINDOW);
                    if received > held {
                        held = received;
                        stalls = 0;
                        first_refusal = None;
                        progress_by = tokio::time::Instant::now() + self.timeout;
                    }
                    // It holds more than we have sent (a resumed upload): go on from there.
                    next = next.max(held);
                    continue;
                }
                Attempt::Done(Ok(other)) => {
                    return Err(OpsError::UnexpectedAnswer {
                        op: "upload_chunk",
                        got: format!("{other:?}"),
                    })
                }
                // Fallout of a round already given up.
                _ if !current => continue,
                Attempt::Done(Err(e)) => {
                    first_refusal.get_or_insert(e);
                    stalls += 1;
                    if stalls >= MAX_STALLS {
                        return Err(first_refusal.unwrap_or_else(|| {
                            fail(format!(
                                "refused {MAX_STALLS} times (it holds {held} of {total} bytes)"
                            ))
                        }));
                    }
                }
                Attempt::Busy(wait) => {
                    window = (window / 2).max(1);
                    tracing::debug!(?wait, window, "upload over this client's rate: waiting");
                    tokio::time::sleep(wait).await;
                }
            }
            // A new round from what the supervisor holds.
            round += 1;
            next = held;
        }
    }

    /// Disconnects cleanly.
    pub async fn close(self) {
        self.link.close().await;
    }
}

/// What one send of a request came to.
enum Attempt {
    /// Answered.
    Done(Result<ApiResult, OpsError>),
    /// Refused for the client's rate: send again after this long.
    Busy(Duration),
}

/// What an answer to a request of operation `op` comes to.
fn settle(op: &'static str, response: ApiResponse) -> Attempt {
    if let (false, Some(ms)) = (response.ok, response.retry_after_ms) {
        return Attempt::Busy(Duration::from_millis(ms.clamp(1, 60_000)));
    }
    Attempt::Done(match (response.ok, response.result, response.error) {
        (true, Some(result), _) => Ok(result),
        (true, None, _) => Err(OpsError::UnexpectedAnswer {
            op,
            got: "ok without a result".into(),
        }),
        (false, _, error) => Err(OpsError::Refused {
            op,
            error: error.unwrap_or_else(|| "no reason given".into()),
            code: response.code,
        }),
    })
}
