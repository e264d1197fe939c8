//! Links and routes over netlink (rtnetlink): bringing the WireGuard link up
//! with the mesh MTU, and routing each peer's /24 into it.
//!
//! Each peer route carries the node's own mesh address as its preferred
//! source, so traffic that the node itself sends into the mesh (its edge
//! proxy, its health checks) leaves with an address the receiving peer
//! accepts: WireGuard drops a packet whose source is outside the sender's
//! allowed range.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::MeshError;

/// The kernel's main routing table.
const MAIN_TABLE: u32 = 254;

#[derive(Clone, Debug)]
pub struct Routes {
    handle: Handle,
}

fn netlink(action: &'static str) -> impl FnOnce(rtnetlink::Error) -> MeshError {
    move |source| MeshError::Netlink { action, source }
}

impl Routes {
    /// Opens a netlink connection; its task ends when the last handle goes.
    pub fn connect() -> Result<Routes, MeshError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| MeshError::Io { action: "open a netlink socket", source })?;
        tokio::spawn(connection);
        Ok(Routes { handle })
    }

    /// The index of link `name`.
    pub async fn link_index(&self, name: &str) -> Result<u32, MeshError> {
        let link = self.handle.link().get().match_name(name.to_owned()).execute().try_next().await;
        match link {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) | Err(_) => Err(MeshError::NoLink { name: name.to_owned() }),
        }
    }

    /// Sets the link's MTU and brings it up. Idempotent. The link needs no
    /// address of its own: routes through it name the node's mesh address
    /// (on its bridge) as their source.
    pub async fn set_up(&self, index: u32, mtu: u32) -> Result<(), MeshError> {
        let message = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle.link().set(message).execute().await.map_err(netlink("bring the WireGuard link up"))
    }

    /// Makes the routes through link `index` exactly `subnets`, each with
    /// preferred source `source`.
    pub async fn sync(&self, index: u32, source: Ipv4Addr, subnets: &[Ipv4Net]) -> Result<(), MeshError> {
        for subnet in subnets {
            let message = route(*subnet, index).pref_source(source).build();
            self.handle.route().add(message).replace().execute().await.map_err(netlink("add a mesh route"))?;
        }
        for (message, destination) in self.routes_through(index).await? {
            if !subnets.contains(&destination) {
                tracing::info!(route = %destination, "removing a mesh route");
                self.handle.route().del(message).execute().await.map_err(netlink("remove a mesh route"))?;
            }
        }
        Ok(())
    }

    /// The IPv4 routes of the main table through link `index`.
    async fn routes_through(&self, index: u32) -> Result<Vec<(RouteMessage, Ipv4Net)>, MeshError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut dump = self.handle.route().get(query).execute();
        let mut found = Vec::new();
        while let Some(message) = dump.try_next().await.map_err(netlink("list routes"))? {
            let (mut destination, mut through, mut table) =
                (Ipv4Addr::UNSPECIFIED, false, u32::from(message.header.table));
            for attribute in &message.attributes {
                match attribute {
                    RouteAttribute::Oif(oif) => through = *oif == index,
                    RouteAttribute::Destination(RouteAddress::Inet(address)) => destination = *address,
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            if through && table == MAIN_TABLE && message.header.address_family == AddressFamily::Inet {
                if let Ok(net) = Ipv4Net::new(destination, message.header.destination_prefix_length) {
                    found.push((message, net));
                }
            }
        }
        Ok(found)
    }
}

fn route(subnet: Ipv4Net, index: u32) -> RouteMessageBuilder<Ipv4Addr> {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(subnet.network(), subnet.prefix_len())
        .output_interface(index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Static)
}
