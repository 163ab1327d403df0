//! [`ApiClient`]: requests to the supervisor over MQTT, one at a time, each waiting (bounded)
//! for its answer.

use std::io::SeekFrom;
use std::time::Duration;

use base64::Engine as _;
use protocol::api::{ApiOp, ApiRequest, ApiResponse, ApiResult, UploadChunk};
use protocol::{CommandId, Payload as _, Topic, Topics, Version};
use rumqttc::{QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::gcode::GcodeFile;
use super::mqtt::{Link, LinkEvent};
use super::{Endpoint, OpsError};

/// Bytes per `upload_chunk` request (the protocol's largest chunk).
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Answers in a row that store nothing new before an upload gives up.
const MAX_STALLS: u32 = 3;

/// A connection to the supervisor's operator API.
pub struct ApiClient {
    link: Link,
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
    /// Connects with a fresh client id and subscribes to its response topic (waiting for the
    /// SUBACK), so no answer can be missed.
    pub async fn connect(ep: &Endpoint) -> Result<ApiClient, OpsError> {
        let mut link = Link::connect(ep, false).await?;
        let response_topic = ep
            .topics
            .format(&Topic::ApiResponse(link.client_id.clone()));
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
        self.next_id += 1;
        let name = op_name(&op);
        let id = CommandId::new(format!("{}-{}", self.link.client_id, self.next_id))
            .unwrap_or_else(|_| unreachable!("a client id plus a counter is a valid command id"));
        let request = ApiRequest {
            v: Version,
            id: id.clone(),
            client: self.link.client_id.clone(),
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
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(OpsError::ConnectionLost {
                    broker,
                    reason: e.to_string(),
                })
            }
            Err(_) => return Err(OpsError::NoAnswer { broker, secs }),
        }
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
            let response = match ApiResponse::decode(&payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an undecodable answer");
                    continue;
                }
            };
            if response.id != id {
                tracing::debug!(id = %response.id, "ignoring an answer to another request");
                continue;
            }
            if let (false, Some(ms)) = (response.ok, response.retry_after_ms) {
                return Ok(Attempt::Busy(Duration::from_millis(ms.clamp(1, 60_000))));
            }
            return Ok(Attempt::Done(
                match (response.ok, response.result, response.error) {
                    (true, Some(result), _) => Ok(result),
                    (true, None, _) => Err(OpsError::UnexpectedAnswer {
                        op: name,
                        got: "ok without a result".into(),
                    }),
                    (false, _, error) => Err(OpsError::Refused {
                        op: name,
                        error: error.unwrap_or_else(|| "no reason given".into()),
                        code: response.code,
                    }),
                },
            ));
        }
    }

    /// Uploads `file` in [`CHUNK_SIZE`] chunks, one request in flight. The supervisor answers
    /// how much it holds (`received`, contiguous from 0) and the next chunk starts there, so an
    /// upload cut short resumes where it stopped, and a file already stored takes one request.
    /// `progress(received, total)` is called after every answer.
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
        let mut offset = 0u64;
        let mut best = 0u64;
        let mut stalls = 0u32;
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let len =
                usize::try_from((total - offset).min(CHUNK_SIZE as u64)).unwrap_or(CHUNK_SIZE);
            reader.seek(SeekFrom::Start(offset)).await.map_err(io)?;
            reader.read_exact(&mut buf[..len]).await.map_err(io)?;
            let op = ApiOp::UploadChunk(UploadChunk {
                sha256: file.sha256.clone(),
                offset,
                total_size: total,
                data_b64: base64::engine::general_purpose::STANDARD.encode(&buf[..len]),
            });
            let (received, their_total) = match self.request(op).await? {
                ApiResult::Uploaded {
                    received,
                    total_size,
                } => (received, total_size),
                other => {
                    return Err(OpsError::UnexpectedAnswer {
                        op: "upload_chunk",
                        got: format!("{other:?}"),
                    })
                }
            };
            if their_total != total {
                return Err(fail(format!(
                    "the supervisor says the file has {their_total} bytes; it has {total}"
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
            if received > best {
                best = received;
                stalls = 0;
            } else {
                stalls += 1;
                if stalls >= MAX_STALLS {
                    return Err(fail(format!(
                        "the supervisor stored nothing new in {MAX_STALLS} requests in a row \
                         (it holds {received} of {total} bytes)"
                    )));
                }
            }
            offset = received;
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
