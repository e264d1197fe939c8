//! `.internal` DNS: each node answers for the cluster's apps at its mesh
//! address, and forwards every other name to its own upstream resolvers.
//!
//! Instances use it as their resolver: they sit on a user-defined Docker
//! network, whose embedded resolver forwards what it does not know to the
//! DNS server the container was created with, which is this one. Names:
//! - `APP.internal`: the mesh addresses of the app's healthy instances;
//! - `GROUP.APP.internal`: those of one process group;
//! - `ID.vm.APP.internal`: one instance;
//! - `_apps.internal` (TXT): the apps with a healthy instance, comma-separated.
//!
//! Answers come from a [`Directory`], rebuilt from the replicated state on
//! every change, so they follow health as soon as a node reports it. The
//! wire format is hickory's; forwarding relays the upstream's answer as it
//! is (rcode, flags and sections), over UDP, retried over TCP when truncated.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::{Time, TokioRuntimeProvider};
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::{DnsExchange, DnsHandle};
use hickory_net::NetError;
use hickory_proto::op::{
    DnsRequest, DnsRequestOptions, DnsResponse, Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::rdata::{A, SOA, TXT};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::sync::watch;

use crate::directory::{Answer, Directory};

/// Short, so that answers follow health closely even in caching resolvers.
pub const TTL_SECONDS: u32 = 5;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle TCP client keeps its connection.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("could not listen for DNS on {protocol} {address}")]
    Bind {
        protocol: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Answers `.internal` from the directory and forwards the rest.
pub struct Handler {
    zone: LowerName,
    /// The zone's name, lowercase, without the trailing dot.
    zone_text: String,
    soa: Record,
    directory: watch::Receiver<Arc<Directory>>,
    upstreams: Vec<(SocketAddr, DnsExchange<TokioRuntimeProvider>)>,
    /// Owns the tasks the exchanges spawn; they end when it is dropped.
    provider: TokioRuntimeProvider,
}

impl Handler {
    /// Must be called inside the runtime: each upstream exchange spawns a task.
    pub fn new(directory: watch::Receiver<Arc<Directory>>, upstreams: &[SocketAddr]) -> Handler {
        Self::for_zone("internal", directory, upstreams)
    }

    /// The same for another zone (tests use one as an upstream resolver).
    pub fn for_zone(zone: &str, directory: watch::Receiver<Arc<Directory>>, upstreams: &[SocketAddr]) -> Handler {
        let zone_text = zone.trim_end_matches('.').to_ascii_lowercase();
        let zone = Name::from_ascii(format!("{zone_text}.")).unwrap_or_else(|_| Name::root());
        let sub = |label: &str| Name::from_ascii(label).ok().and_then(|n| n.append_domain(&zone).ok());
        let soa = Record::from_rdata(
            zone.clone(),
            TTL_SECONDS,
            RData::SOA(SOA::new(
                sub("ns").unwrap_or_else(|| zone.clone()),
                sub("hostmaster").unwrap_or_else(|| zone.clone()),
                1,
                3600,
                600,
                86400,
                TTL_SECONDS,
            )),
        );
        let provider = TokioRuntimeProvider::default();
        let upstreams = upstreams
            .iter()
            .map(|address| {
                let exchange = UdpClientStream::builder(*address, provider.clone())
                    .with_timeout(Some(UPSTREAM_TIMEOUT))
                    .exchange();
                (*address, exchange)
            })
            .collect();
        Handler { zone: zone.into(), zone_text, soa, directory, upstreams, provider }
    }

    /// The records for a query under `internal.`, and its response code.
    fn answer(&self, name: &LowerName, query_type: RecordType) -> (ResponseCode, Vec<Record>) {
        let owner = Name::from(name.clone());
        let text = owner.to_ascii().to_ascii_lowercase();
        let relative =
            text.trim_end_matches('.').strip_suffix(self.zone_text.as_str()).unwrap_or_default().trim_end_matches('.');
        if relative.is_empty() {
            let records = match query_type {
                RecordType::SOA | RecordType::ANY => vec![self.soa.clone()],
                _ => Vec::new(),
            };
            return (ResponseCode::NoError, records);
        }
        let answer = self.directory.borrow().resolve(relative);
        match answer {
            Answer::NoSuchName => (ResponseCode::NXDomain, Vec::new()),
            Answer::Addresses(addresses) => {
                let records = match query_type {
                    RecordType::A | RecordType::ANY => addresses
                        .into_iter()
                        .map(|ip| Record::from_rdata(owner.clone(), TTL_SECONDS, RData::A(A(ip))))
                        .collect(),
                    _ => Vec::new(),
                };
                (ResponseCode::NoError, records)
            }
            Answer::Apps(apps) => {
                let records = match query_type {
                    RecordType::TXT | RecordType::ANY if !apps.is_empty() => {
                        vec![Record::from_rdata(owner, TTL_SECONDS, RData::TXT(TXT::new(txt_strings(&apps))))]
                    }
                    _ => Vec::new(),
                };
                (ResponseCode::NoError, records)
            }
        }
    }

    async fn forward(&self, request: &Request) -> Result<DnsResponse, NetError> {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.metadata.checking_disabled = request.metadata.checking_disabled;
        let Some(query) = request.queries.queries().first() else {
            return Err(NetError::from("no query"));
        };
        message.queries.push(query.original().clone());
        let mut edns = Edns::new();
        edns.set_max_payload(1232).set_dnssec_ok(request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok));
        message.edns = Some(edns);
        let options = DnsRequestOptions::default();
        let mut last = NetError::from("no upstream resolver is configured");
        for (address, udp) in &self.upstreams {
            let response = match udp.send(DnsRequest::new(message.clone(), options)).next().await {
                Some(Ok(response)) => response,
                Some(Err(error)) => {
                    last = error;
                    continue;
                }
                None => {
                    last = NetError::Timeout;
                    continue;
                }
            };
            if !response.metadata.truncation {
                return Ok(response);
            }
            match TcpClientStream::exchange(*address, None, UPSTREAM_TIMEOUT, None, self.provider.clone()).await {
                Ok(tcp) => match tcp.send(DnsRequest::new(message.clone(), options)).next().await {
                    Some(Ok(response)) => return Ok(response),
                    Some(Err(error)) => last = error,
                    None => last = NetError::Timeout,
                },
                Err(error) => last = error,
            }
        }
        Err(last)
    }
}

/// Comma-joined names, in character-strings of at most 255 bytes.
fn txt_strings(apps: &[String]) -> Vec<String> {
    let mut strings: Vec<String> = Vec::new();
    let mut current = String::new();
    for app in apps {
        if !current.is_empty() && current.len() + 1 + app.len() > 255 {
            strings.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(',');
        }
        current.push_str(app);
    }
    strings.push(current);
    strings
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut reply: R) -> ResponseInfo {
        let mut edns = request.edns.as_ref().map(|e| {
            let mut edns = Edns::new();
            edns.set_max_payload(e.max_payload().max(512));
            edns
        });
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let queries = request.queries.queries();
        let sent = if request.metadata.op_code != OpCode::Query || queries.len() != 1 {
            let code = if queries.len() == 1 { ResponseCode::NotImp } else { ResponseCode::FormErr };
            let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
            reply.send_response(builder.error_msg(&request.metadata, code)).await
        } else if self.zone.zone_of(queries[0].name()) {
            metadata.authoritative = true;
            let (code, answers) = self.answer(queries[0].name(), queries[0].query_type());
            metadata.response_code = code;
            let soa = answers.is_empty().then_some(&self.soa);
            let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
            reply.send_response(builder.build(metadata, answers.iter(), [], soa, [])).await
        } else {
            match self.forward(request).await {
                Ok(upstream) => {
                    metadata.response_code = upstream.metadata.response_code;
                    metadata.authentic_data = upstream.metadata.authentic_data;
                    metadata.recursion_available = upstream.metadata.recursion_available;
                    if let Some(edns) = edns.as_mut() {
                        edns.set_rcode_high(upstream.metadata.response_code.high());
                    }
                    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
                    let response = builder.build(
                        metadata,
                        upstream.answers.iter(),
                        upstream.authorities.iter(),
                        [],
                        upstream.additionals.iter(),
                    );
                    reply.send_response(response).await
                }
                Err(error) => {
                    tracing::debug!(%error, "forwarding a DNS query failed");
                    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
                    reply.send_response(builder.error_msg(&request.metadata, ResponseCode::ServFail)).await
                }
            }
        };
        sent.unwrap_or_else(|_| {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
        })
    }
}

/// A running DNS server.
pub struct DnsServer {
    server: Server<Handler>,
    address: SocketAddr,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").field("address", &self.address).finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Serves UDP and TCP on `address` (port 0: one free port for both).
    pub async fn serve(address: SocketAddr, handler: Handler) -> Result<DnsServer, DnsError> {
        let bind_error = |protocol, source| DnsError::Bind { protocol, address, source };
        let udp = tokio::net::UdpSocket::bind(address).await.map_err(|e| bind_error("UDP", e))?;
        let address = udp.local_addr().map_err(|e| bind_error("UDP", e))?;
        let tcp = tokio::net::TcpListener::bind(address).await.map_err(|e| bind_error("TCP", e))?;
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, 32);
        Ok(DnsServer { server, address })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub async fn stop(mut self) {
        if let Err(error) = self.server.shutdown_gracefully().await {
            tracing::debug!(%error, "the DNS server ended with an error");
        }
    }
}

/// The resolvers a `resolv.conf` names (IPv4 and IPv6 nameservers, port 53).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// One query, for tests and diagnostics: the response code and the A
/// records (or TXT strings) of the answer.
pub async fn query(
    server: SocketAddr,
    name: &str,
    record_type: RecordType,
) -> Result<(ResponseCode, Vec<String>), NetError> {
    let stream =
        UdpClientStream::builder(server, TokioRuntimeProvider::default()).with_timeout(Some(UPSTREAM_TIMEOUT)).build();
    let (mut client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
    let task = tokio::spawn(background);
    let name = Name::from_str(name)?;
    let response = client.query(name, DNSClass::IN, record_type).await;
    task.abort();
    let response = response?;
    let values = response
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::TXT(txt) => Some(txt.to_string()),
            _ => None,
        })
        .collect();
    Ok((response.metadata.response_code, values))
}

#[cfg(test)]
mod tests;
