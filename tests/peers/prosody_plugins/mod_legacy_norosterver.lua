-- mod_legacy_norosterver: make Prosody look like a server without roster versioning
-- (RFC 6121 2.6), so the proxy's emulation is tested against a server that truly lacks it.
--  * removes the urn:xmpp:features:rosterver stream feature;
--  * strips 'ver' from roster queries in requests (the full roster is always returned);
--  * strips 'ver' from roster results and roster pushes.

local filters = require "util.filters";

local ROSTER = "jabber:iq:roster";
local ROSTERVER = "urn:xmpp:features:rosterver";

-- mod_roster adds the feature at priority 0; run after it and take it out again.
module:hook("stream-features", function(event)
	event.features:remove_children("ver", ROSTERVER);
end, -1000);

local function roster_query(stanza)
	if stanza and stanza.name == "iq" then
		local query = stanza.tags[1];
		if query and query.name == "query" and query.attr.xmlns == ROSTER then
			return query;
		end
	end
	return nil;
end

-- Incoming: a client 'ver' equal to the server's would get an empty result; drop it.
local function strip_in(stanza, session)
	if session.host == module.host then
		local query = roster_query(stanza);
		if query then query.attr.ver = nil; end
	end
	return stanza;
end

-- Outgoing: results and pushes (a push stanza is shared by all resources; fine, all strip).
local function strip_out(stanza, session)
	if session.host == module.host then
		local query = roster_query(stanza);
		if query then query.attr.ver = nil; end
	end
	return stanza;
end

local function init_filters(session)
	filters.add_filter(session, "stanzas/in", strip_in, 1000);
	filters.add_filter(session, "stanzas/out", strip_out, 1000);
end

filters.add_filter_hook(init_filters);

function module.unload()
	filters.remove_filter_hook(init_filters);
end
